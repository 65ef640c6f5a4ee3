"""How a command reaches agents: ``--key-file`` and ``--tls-*``, and the TLS context.

Kept apart from :mod:`vfmig.cli.agent_client` so that a command that only declares these
options (``vfmig journal``, ``vfmig migrate``) does not load the protocol to do so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vfmig.core.errors import UsageError

if TYPE_CHECKING:
    import argparse
    import ssl


def add_link_arguments(parser: argparse.ArgumentParser, *, key_required: bool) -> None:
    """``--key-file`` and ``--tls-*``: how a command reaches agents (:func:`client_tls`)."""
    parser.add_argument(
        "--key-file",
        type=Path,
        metavar="PATH",
        required=key_required,
        help="shared key of the agents (vfmig keygen)",
    )
    parser.add_argument("--tls-cert", type=Path, metavar="PATH", help="client certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, metavar="PATH", help="its private key (PEM)")
    parser.add_argument(
        "--tls-ca", type=Path, metavar="PATH", help="CA that signed the agents' certificates"
    )


def client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """A TLS client context from ``--tls-*``, or None for plain TCP."""
    cert, key, ca = args.tls_cert, args.tls_key, args.tls_ca
    if cert is None and key is None and ca is None:
        return None
    import ssl

    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS files: {exc}") from None
    return context
