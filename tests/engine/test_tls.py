"""Agents and orchestrators over TLS (the protocol's own authentication still runs inside)."""

from __future__ import annotations

import pytest

from vfmig.core.errors import PeerError
from vfmig.core.fsm import DeviceState
from vfmig.core.model import Outcome

S = DeviceState


async def tls_agents(cluster, sims, certificates, host_runs=None):
    """Agents A and B over TLS; A hosts runs for thin clients into ``host_runs`` if given."""
    made = []
    for name, hosting in (("A", host_runs), ("B", None)):
        root = sims.root.parent / name
        root.mkdir()
        made.append(
            await cluster.agent(
                type(sims)(root, relative=True),
                server_ssl=certificates.server(),
                client_ssl=certificates.client(),
                host_runs=hosting,
            )
        )
    return made


async def test_a_migration_over_tls(cluster, sims, certificates) -> None:
    a, b = await tls_agents(cluster, sims, certificates)
    cluster.client_ssl = certificates.client()
    src = a.sims.spec("a", size=2 << 20, at=a.address)
    dst = b.sims.spec("b", size=2 << 20, image=False, dump=True, at=b.address)
    report = await cluster.migrate([(src, dst)])
    assert report.outcome is Outcome.COMPLETED, (report.summary, a.log, b.log)
    await cluster.settle()
    assert (a.sims.state("a"), b.sims.state("b")) == (S.STOP, S.RUNNING)
    assert b.sims.dump("b") == a.sims.image("a")


async def test_plain_tcp_to_a_tls_agent_is_refused(cluster, sims, certificates) -> None:
    a, _ = await tls_agents(cluster, sims, certificates)
    src = a.sims.spec("a", at=a.address)
    dst = a.sims.spec("b", image=False, at=a.address)
    with pytest.raises(PeerError) as caught:
        await cluster.migrate([(src, dst)])
    assert "during the handshake" in str(caught.value)
    assert "both sides use TLS" in (caught.value.hint or "")
    assert (a.sims.state("a"), a.sims.state("b")) == (None, None)
    assert any("TLS handshake failed" in line for line in a.log)


async def test_a_thin_client_over_tls(cluster, sims, certificates, key_file, tmp_path) -> None:
    import trio

    from vfmig.journal.store import JournalStore

    from .conftest import run_cli

    a, b = await tls_agents(cluster, sims, certificates, JournalStore(tmp_path / "j"))
    src = a.sims.spec("a", size=2 << 20, at=a.address)
    dst = b.sims.spec("b", size=2 << 20, image=False, dump=True, at=b.address)
    tls = ["--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key)]
    tls += ["--tls-ca", str(certificates.ca)]
    argv = ["migrate", "--via", a.address, "--key-file", str(key_file), *tls, src, dst]
    result = await trio.to_thread.run_sync(lambda: run_cli(*argv))
    assert result.status == 0, result.stdout + result.stderr
    assert (a.sims.state("a"), b.sims.state("b")) == (S.STOP, S.RUNNING)
    assert b.sims.dump("b") == a.sims.image("a")
    plain = await trio.to_thread.run_sync(lambda: run_cli(*argv[:5], *argv[-2:]))
    assert plain.status == 4
    assert "during the handshake" in plain.stderr
    assert "both sides use TLS" in plain.stderr
