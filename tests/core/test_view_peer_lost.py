"""The timeline shows a lost agent: its host, its devices, the side of the commit point."""

from __future__ import annotations

from dataclasses import dataclass

from vfmig.core import events as ev
from vfmig.core.model import Phase, destination, source
from vfmig.core.view import RunView, reduce, timeline
from vfmig.journal.synthetic import DESTINATION_HOST, Faults, Scenario, run


@dataclass(frozen=True, slots=True)
class Rec:
    seq: int
    at_ns: int
    event: ev.Event


def lines_of(scenario: Scenario) -> list[str]:
    model = RunView()
    lines: list[str] = []
    for i, o in enumerate(run(scenario)):
        record = Rec(i, o.at_ns, o.event)
        lines += timeline(model, record)
        model = reduce(model, record)
    return lines


def test_a_lost_agent_is_in_the_timeline_with_its_devices() -> None:
    lines = lines_of(Scenario(faults=Faults(lose_host=(DESTINATION_HOST, Phase.STOPCOPY))))
    lost = [line for line in lines if line.startswith("LOST")]
    assert lost == [f"LOST agent {DESTINATION_HOST} (dst0) before the commit point"]


def test_the_line_says_after_the_commit_point_and_every_device() -> None:
    event = ev.PeerLost(host="hostA:7300", devices=(source(0), destination(1)), committed=True)
    assert timeline(RunView(), Rec(0, 0, event)) == [
        "LOST agent hostA:7300 (src0, dst1) after the commit point"
    ]
