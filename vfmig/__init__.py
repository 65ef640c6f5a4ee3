"""vfmig: live migration of VFIO devices without a VM."""

from __future__ import annotations

__version__ = "0.1.0"
