"""Chunk payload encoding: pure functions, safe to run in a worker thread.

Compression is the dominant cost of the data path, and zstandard releases the GIL, so
the engine runs :func:`encode_chunk_payload` and :func:`decode_chunk_payload` in a worker
thread while the :class:`~vfmig.protocol.Connection` (framing, flow control, digest) stays
on the event loop. These functions touch no connection state; each compressor or
decompressor object must be used by one thread at a time (keep one per worker).

Each chunk is an independent zstd frame, or raw when compression would not shrink it:
chunks of one shared zstd stream could not be sent raw in between.

Bounding (a decompression bomb must not become an out-of-memory): python-zstandard's
``decompress()`` allocates the size the frame header *declares*, and neither
``max_output_size`` nor ``decompressobj()`` bounds that. So :func:`check_chunk` requires
the declared content size to be present and equal to the chunk's ``raw_len``, which is at
most the negotiated chunk size, before anything is decompressed; a frame that then
produces more or fewer bytes fails inside zstd ("destination buffer is too small").

zstandard is imported where a chunk is first (de)compressed or checked, not with the
package: a control-only user of the protocol (the thin ``vfmig migrate --via``) never
loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._errors import ErrorCode, LocalProtocolError
from ._events import DataChunk, Encoding

if TYPE_CHECKING:
    import zstandard


def make_compressor(level: int) -> zstandard.ZstdCompressor:
    """A reusable compressor context: content size in every frame header, no checksum
    (the keyed stream digest covers integrity), no dictionary id."""
    import zstandard

    return zstandard.ZstdCompressor(
        level=level, write_content_size=True, write_checksum=False, write_dict_id=False
    )


def make_decompressor(max_chunk_size: int) -> zstandard.ZstdDecompressor:
    """A reusable decompressor context whose window is capped near the chunk size."""
    import zstandard

    window = 1 << max(20, (max_chunk_size - 1).bit_length())
    return zstandard.ZstdDecompressor(max_window_size=window)


def encode_chunk_payload(
    compressor: zstandard.ZstdCompressor | None, raw: bytes | bytearray | memoryview
) -> tuple[Encoding, bytes | bytearray | memoryview]:
    """``(encoding, payload)`` for ``raw``: a zstd frame if that is smaller, else ``raw``
    itself (not copied: do not reuse its buffer until the chunk is sent).

    ``compressor`` is None when the session has no compression.
    """
    if compressor is not None:
        packed: bytes = compressor.compress(raw)
        if len(packed) < len(raw):
            return Encoding.ZSTD, packed
    return Encoding.RAW, raw


def check_chunk(chunk: DataChunk, max_chunk_size: int) -> None:
    """Structural checks before a chunk's payload is trusted with an allocation.

    Raises LocalProtocolError (the Connection's receive boundary turns it into a
    RemoteProtocolError; :func:`decode_chunk_payload` does so itself).
    """
    if not 1 <= chunk.raw_len <= max_chunk_size:
        raise LocalProtocolError(
            f"chunk {chunk.seq} of stream {chunk.stream}: raw length {chunk.raw_len} is "
            f"outside 1..max_chunk_size={max_chunk_size}",
            code=ErrorCode.BAD_CHUNK,
            limit="max_chunk_size",
        )
    size = len(chunk.payload)
    if chunk.encoding is Encoding.RAW:
        if size != chunk.raw_len:
            raise _bad_chunk(chunk, f"raw payload of {size} bytes, raw length {chunk.raw_len}")
        return
    if size >= chunk.raw_len:
        raise _bad_chunk(chunk, f"zstd payload of {size} bytes does not shrink {chunk.raw_len}")
    import zstandard

    try:
        declared = zstandard.frame_content_size(chunk.payload)
    except zstandard.ZstdError:
        raise _bad_chunk(chunk, "payload does not start with a zstd frame header") from None
    if declared != chunk.raw_len:
        shown = "no content size" if declared < 0 else f"content size {declared}"
        raise _bad_chunk(chunk, f"zstd frame declares {shown}, raw length is {chunk.raw_len}")


def decode_chunk_payload(
    decompressor: zstandard.ZstdDecompressor | None, chunk: DataChunk, max_chunk_size: int
) -> bytes | memoryview:
    """The raw bytes of a received chunk (a RAW payload is returned as is).

    Raises RemoteProtocolError for any payload that is not exactly one zstd frame of
    ``raw_len`` bytes. Allocates at most ``raw_len`` (<= ``max_chunk_size``) bytes.
    """
    try:
        check_chunk(chunk, max_chunk_size)
        if chunk.encoding is Encoding.RAW:
            return chunk.payload
        if decompressor is None:
            raise _bad_chunk(chunk, "zstd payload but the session has no compression")
        import zstandard

        try:
            raw: bytes = decompressor.decompress(chunk.payload, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise _bad_chunk(chunk, f"zstd: {exc}") from None
        if len(raw) != chunk.raw_len:
            raise _bad_chunk(chunk, f"decompressed to {len(raw)} bytes, not {chunk.raw_len}")
        return raw
    except LocalProtocolError as exc:
        exc._reraise_as_remote_protocol_error()


def _bad_chunk(chunk: DataChunk, problem: str) -> LocalProtocolError:
    return LocalProtocolError(
        f"chunk {chunk.seq} of stream {chunk.stream}: {problem}", code=ErrorCode.BAD_CHUNK
    )
