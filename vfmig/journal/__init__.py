"""The flight recorder: journal files (codec, reader, writer), their store, and the recorder task.

``codec`` is pure (bytes in, bytes out); ``reader`` and ``writer`` are synchronous file I/O;
``store`` is the default journal directory with rotation; ``recorder`` is the only module
that uses trio (the engine's bus subscriber). The format is specified in docs/journal.md.
"""

from __future__ import annotations
