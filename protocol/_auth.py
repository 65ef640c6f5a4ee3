"""Authentication, the key schedule, control-frame MACs and the stream digest.

Theory of operation
-------------------
Both sides hold a pre-shared key ``K`` (or, in the explicit no-key mode, the empty
string). Each sends a Hello with a fresh 32-byte nonce. The *transcript* is SHA-256 over
both Hello frames exactly as they travelled, the first role's first (orchestrator,
data-sender), so both sides compute the same value and any change to either Hello in
flight changes it. Keys are derived HKDF-style (RFC 5869, SHA-256, one output block)::

    PRK           = HMAC(transcript, K)                           # extract
    key(label)    = HMAC(PRK, "vfmig/<version> " + label + 0x01)   # expand
    proof(role)   = HMAC(key("auth " + role), transcript)          # the Auth message
    control(role) = key("control " + role)      # MACs of control frames that role sends
    stream(id)    = key("stream " + id)         # digest of one data stream

The key never crosses the wire. A proof binds the role that made it and both nonces, so
a replayed Auth (old nonces) or a reflected one (the other role's label) fails, and
``hmac.compare_digest`` compares it. Control frames carry ``seq`` (u64, from 0 per
direction) and a 16-byte truncated HMAC over header, seq and body: the receiver checks
the MAC, then that ``seq`` is exactly the next one, so alteration, injection, replay,
reordering and dropping are all detected.

Data chunks carry no MAC. The sender's stream digest is an HMAC, keyed per stream, over
every chunk's header, payload length and payload *as sent* (after compression), in
order, then the total and the chunk count; it travels in the MAC-protected EndOfStream.
Zstd decompression is deterministic, so authenticating the wire form authenticates the
raw stream as well, at a third of the hashing cost on realistic data (docs/adr/0002).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

from ._codec import DIGEST_SIZE, NONCE_SIZE
from ._framing import MAC_SIZE

_HANDSHAKE_LABEL = b"vfmig handshake\x00"
_END = struct.Struct(">3sQQ")


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def transcript_hash(first_hello: bytes, second_hello: bytes) -> bytes:
    """SHA-256 of both Hello frames (header and body), length-prefixed, first role first."""
    h = hashlib.sha256(_HANDSHAKE_LABEL)
    for frame in (first_hello, second_hello):
        h.update(len(frame).to_bytes(4, "big"))
        h.update(frame)
    return h.digest()


class SessionKeys:
    """Every key of one connection, derived from the shared key and the transcript."""

    def __init__(self, key: bytes | None, transcript: bytes, version: int) -> None:
        self.transcript = transcript
        self._prk = hmac.digest(transcript, key or b"", "sha256")
        self._prefix = f"vfmig/{version} ".encode()

    def derive(self, label: str) -> bytes:
        return hmac.digest(self._prk, self._prefix + label.encode() + b"\x01", "sha256")

    def proof(self, role: str) -> bytes:
        """The Auth MAC a side with ``role`` sends."""
        return hmac.digest(self.derive(f"auth {role}"), self.transcript, "sha256")

    def check_proof(self, role: str, mac: bytes) -> bool:
        return hmac.compare_digest(self.proof(role), mac)

    def control_mac(self, sender_role: str) -> ControlMac:
        return ControlMac(self.derive(f"control {sender_role}"))

    def stream_digest(self, stream: int) -> StreamDigest:
        return StreamDigest(self.derive(f"stream {stream}"))


class ControlMac:
    """Truncated HMAC-SHA256 of control frames in one direction (keyed once, copied)."""

    def __init__(self, key: bytes) -> None:
        self._keyed = hmac.new(key, digestmod="sha256")

    def tag(self, *parts: bytes | bytearray | memoryview) -> bytes:
        h = self._keyed.copy()
        for part in parts:
            h.update(part)
        return h.digest()[:MAC_SIZE]

    def check(self, mac: bytes | bytearray | memoryview, *parts: bytes | memoryview) -> bool:
        return hmac.compare_digest(self.tag(*parts), bytes(mac))


class StreamDigest:
    """Keyed digest of one data stream, fed chunk by chunk in order (constant memory)."""

    def __init__(self, key: bytes) -> None:
        self._h = hmac.new(key, digestmod="sha256")

    def add(self, chunk_header: bytes | memoryview, payload: bytes | memoryview) -> None:
        self._h.update(chunk_header)
        self._h.update(len(payload).to_bytes(4, "big"))
        self._h.update(payload)

    def finish(self, total: int, chunks: int) -> bytes:
        self._h.update(_END.pack(b"end", total, chunks))
        digest = self._h.digest()
        assert len(digest) == DIGEST_SIZE
        return digest
