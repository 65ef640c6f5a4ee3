"""vfmig.core.fsm against the kernel's rules as vfio-migration.md states them, exhaustively.

Expectations are written here from the document (§1 states and flags, §2 table and rules, §3
data fd), not computed with the module's own helpers, so a wrong transcription or a wrong
helper shows up as a disagreement. test_fsm_kernel.py compares the same module with the
kernel's compiled function.
"""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfmig.core import fsm
from vfmig.core.fsm import ArcEffect, DeviceState, MigrationFlags

S = DeviceState
F = MigrationFlags
ER, ST, RU, SC, RS = S.ERROR, S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING
RP, PC, PP = S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P
ALL = F.STOP_COPY | F.P2P | F.PRE_COPY
NO_P2P = F.STOP_COPY | F.PRE_COPY

#: Targets beyond the enum that a SET can carry (device_state is a u32).
OUT_OF_RANGE = (8, 9, 255, 2**32 - 1)
TARGETS = (*range(fsm.NUM_STATES), *OUT_OF_RANGE)
CASES = [(flags, cur, new) for flags in fsm.FLAG_SETS for cur in DeviceState for new in TARGETS]

ABBREV = {"ST": ST, "RU": RU, "SC": SC, "RS": RS, "RP": RP, "PC": PC, "PP": PP, "ER": ER}

#: vfio-migration.md §2, the next-step table as printed there ("=" on the diagonal).
DOC_TABLE = """
     ST RU SC RS RP PC PP
  ST =  RP SC RS RP RP RP
  RU RP =  RP RP RP PC RP
  SC ST ST =  ST ST ER ER
  RS ST ST ST =  ST ST ST
  RP ST RU ST ST =  RU PP
  PC RU RU PP RU RU =  PP
  PP RP RP SC RP RP PC =
"""

#: vfio-migration.md §1, the "needs" column (ERROR: never requestable).
NEEDS = {
    ST: F.STOP_COPY,
    RU: F.STOP_COPY,
    SC: F.STOP_COPY,
    RS: F.STOP_COPY,
    RP: F.STOP_COPY | F.P2P,
    PC: F.STOP_COPY | F.PRE_COPY,
    PP: F.STOP_COPY | F.P2P | F.PRE_COPY,
}
SAVING = {PC, PP, SC}
HAS_SESSION = SAVING | {RS}
BLOCKED = {(SC, PC), (SC, PP)}


def has(state: int, flags: MigrationFlags) -> bool:
    return state in NEEDS and NEEDS[DeviceState(state)] & flags == NEEDS[DeviceState(state)]


def kernel_refuses(cur: DeviceState, new: int, flags: MigrationFlags) -> bool:
    """§2 "Checked first", "cur == new" and "Refused", restated."""
    if cur == new:
        return False
    return not has(cur, flags) or not has(new, flags) or (cur, new) in BLOCKED


def show(flags: MigrationFlags, cur: DeviceState, new: int) -> str:
    target = DeviceState(new).name if 0 <= new < fsm.NUM_STATES else str(new)
    return f"[{fsm.flag_names(flags)}] {cur.name}->{target}"


# --- the transcription -------------------------------------------------------------------


def test_kernel_table_is_the_documented_one() -> None:
    header, *rows = DOC_TABLE.split("\n")[1:-1]
    columns = [ABBREV[name] for name in header.split()]
    assert len(rows) == 7
    for row in rows:
        name, *cells = row.split()
        cur = ABBREV[name]
        for new, cell in zip(columns, cells, strict=True):
            expected = cur if cell == "=" else ABBREV[cell]
            assert fsm.KERNEL_TABLE[cur][new] is expected, f"{cur.name}->{new.name}"
    assert set(fsm.KERNEL_TABLE) == set(DeviceState)
    for cur in DeviceState:
        assert fsm.KERNEL_TABLE[cur][ER] is ER
        assert fsm.KERNEL_TABLE[ER][cur] is ER


def test_required_flags_are_the_documented_ones() -> None:
    assert fsm.REQUIRED_FLAGS == {**NEEDS, ER: None}
    assert fsm.FLAG_SETS == (F.STOP_COPY, F.STOP_COPY | F.P2P, NO_P2P, ALL)
    assert [int(s) for s in DeviceState] == list(range(fsm.NUM_STATES))
    assert [int(f) for f in MigrationFlags] == [1, 2, 4]


def test_supports_matches_the_needs_column() -> None:
    for flags, state in itertools.product(fsm.FLAG_SETS, (*range(-1, 8), *OUT_OF_RANGE)):
        assert fsm.supports(state, flags) is has(state, flags), (state, flags)


# --- paths -------------------------------------------------------------------------------


def test_every_request_terminates_within_8_steps() -> None:
    """Walk next_state() with a cap, independently of path(), and compare."""
    longest = 0
    for flags, cur, new in CASES:
        here, states = cur, list[DeviceState]()
        while here != new and len(states) <= 8:
            step = fsm.next_state(here, new, flags)
            if step is None:
                break
            states.append(step)
            here = step
        assert len(states) <= 8, f"{show(flags, cur, new)} does not end: {states}"
        result = fsm.path(cur, new, flags)
        if result.errno is None:
            assert list(result.states) == states, show(flags, cur, new)
            assert here == new
        longest = max(longest, len(result.arcs))
    assert longest == 4  # RESUMING -> STOP -> RUNNING_P2P -> RUNNING -> PRE_COPY


def test_every_intermediate_state_is_supported() -> None:
    for flags, cur, new in CASES:
        for state in fsm.path(cur, new, flags).states:
            assert has(state, flags), f"{show(flags, cur, new)} passes {state.name}"


def test_einval_exactly_where_the_kernel_refuses() -> None:
    for flags, cur, new in CASES:
        result = fsm.path(cur, new, flags)
        if kernel_refuses(cur, new, flags):
            assert result.errno == errno.EINVAL, show(flags, cur, new)
            assert result.arcs == (), show(flags, cur, new)
        else:
            assert result.errno is None, show(flags, cur, new)
            assert (result.states[-1] if result.arcs else cur) == new, show(flags, cur, new)


def test_refusals_come_at_the_first_lookup_never_mid_path() -> None:
    for flags, cur, new in CASES:
        if cur == new:
            continue
        result = fsm.path(cur, new, flags)
        if result.errno is not None:
            assert fsm.next_state(cur, new, flags) is None, show(flags, cur, new)
            continue
        for arc in result.arcs:
            assert fsm.next_state(arc.src, new, flags) is arc.dst, show(flags, cur, new)


def test_an_fd_opening_arc_is_always_the_last_arc() -> None:
    opening = {ArcEffect.OPENS_SAVING, ArcEffect.OPENS_RESUMING}
    for flags, cur, new in CASES:
        arcs = fsm.path(cur, new, flags).arcs
        for arc in arcs[:-1]:
            assert arc.effect not in opening, f"{show(flags, cur, new)}: {arc}"
            assert arc.dst is not RS, f"{show(flags, cur, new)}: RESUMING is interior"


def test_paths_enter_the_saving_group_only_as_the_last_arc() -> None:
    for flags, cur, new in CASES:
        arcs = fsm.path(cur, new, flags).arcs
        for i, arc in enumerate(arcs):
            if arc.src not in SAVING and arc.dst in SAVING:
                assert i == len(arcs) - 1, f"{show(flags, cur, new)} enters at {arc}"
        left = False
        for arc in arcs:
            left = left or (arc.src in SAVING and arc.dst not in SAVING)
            assert not (left and arc.dst in SAVING), f"{show(flags, cur, new)} re-enters"


@pytest.mark.parametrize("flags", fsm.FLAG_SETS[2:], ids=fsm.flag_names)
def test_pre_copy_to_stop_copy_passes_pre_copy_p2p_only_with_p2p(flags: MigrationFlags) -> None:
    result = fsm.path(PC, SC, flags)
    assert result.states == ((PP, SC) if F.P2P in flags else (SC,))
    assert [a.effect for a in result.arcs] == [ArcEffect.CONTINUES] * len(result.arcs)


@pytest.mark.parametrize("flags", fsm.FLAG_SETS, ids=fsm.flag_names)
@pytest.mark.parametrize("target", [PC, PP])
def test_stop_copy_to_pre_copy_is_refused_everywhere(
    flags: MigrationFlags, target: DeviceState
) -> None:
    assert fsm.path(SC, target, flags).errno == errno.EINVAL
    assert fsm.next_state(SC, target, flags) is None
    assert (SC, target) in fsm.VFMIG_REFUSALS
    assert "blocked arc" in fsm.VFMIG_REFUSALS[(SC, target)]
    reason = fsm.vfmig_refusal(SC, target, flags)
    kernel = fsm.kernel_refusal(SC, target, flags)
    assert reason is not None
    assert kernel is not None
    if has(target, flags):  # the request reaches the table: a blocked arc
        assert reason == fsm.VFMIG_REFUSALS[(SC, target)]
        assert "blocked arc" in kernel
    else:  # refused for the missing flag before the table is consulted
        assert "lacks" in reason
        assert "lacks" in kernel


def test_vfmig_refusals_are_exactly_the_blocked_arcs() -> None:
    assert set(fsm.VFMIG_REFUSALS) == BLOCKED


# vfio-migration.md §2 "Combination arcs" and "cur == new", pinned.
@pytest.mark.parametrize(
    ("cur", "new", "flags", "states"),
    [
        (RU, SC, ALL, (RP, ST, SC)),
        (RU, RS, ALL, (RP, ST, RS)),
        (PC, SC, ALL, (PP, SC)),
        (RU, SC, F.STOP_COPY, (ST, SC)),
        (RU, SC, NO_P2P, (ST, SC)),
        (RS, PC, ALL, (ST, RP, RU, PC)),
        (SC, RU, F.STOP_COPY, (ST, RU)),
        (PP, RS, ALL, (RP, ST, RS)),
    ],
    ids=lambda v: v.name if isinstance(v, DeviceState) else None,
)
def test_documented_paths(
    cur: DeviceState, new: DeviceState, flags: MigrationFlags, states: tuple[DeviceState, ...]
) -> None:
    result = fsm.path(cur, new, flags)
    assert result.errno is None
    assert result.states == states
    assert [(a.src, a.dst) for a in result.arcs] == list(itertools.pairwise((cur, *states)))


@pytest.mark.parametrize("flags", fsm.FLAG_SETS, ids=fsm.flag_names)
@pytest.mark.parametrize("state", list(DeviceState), ids=lambda s: s.name)
def test_same_state_succeeds_with_an_empty_path(flags: MigrationFlags, state: DeviceState) -> None:
    """Even ERROR -> ERROR, and states the flags lack: the drivers' loop does not run."""
    result = fsm.path(state, state, flags)
    assert result == fsm.KernelPath(arcs=(), errno=None)
    assert result.states == ()
    assert fsm.kernel_refusal(state, state, flags) is None
    assert fsm.vfmig_refusal(state, state, flags) is None
    assert fsm.plan(state, state, flags).opens is None


# --- refusals ----------------------------------------------------------------------------


def test_vfmig_refuses_exactly_what_the_kernel_refuses() -> None:
    """vfmig sends nothing the kernel would refuse, and nothing else is held back."""
    for flags, cur, new in CASES:
        refuses = kernel_refuses(cur, new, flags)
        assert (fsm.vfmig_refusal(cur, new, flags) is not None) is refuses, show(flags, cur, new)
        assert (fsm.kernel_refusal(cur, new, flags) is not None) is refuses, show(flags, cur, new)


def test_no_path_crosses_a_vfmig_refusal() -> None:
    for flags, cur, new in CASES:
        for arc in fsm.path(cur, new, flags).arcs:
            assert (arc.src, arc.dst) not in fsm.VFMIG_REFUSALS, show(flags, cur, new)


@pytest.mark.parametrize(
    ("cur", "new", "flags", "vfmig_says", "kernel_says"),
    [
        (ER, ST, ALL, "in ERROR: only a reset", "ERROR is not a valid current state"),
        (ER, 8, ALL, "in ERROR: only a reset", "ERROR is not a valid current state"),
        (PC, RU, F.STOP_COPY, "PRE_COPY, a state its flags do not allow", "PRE_COPY needs PRE"),
        (ST, ER, ALL, "ERROR cannot be requested", "ERROR cannot be requested"),
        (RU, PC, F.STOP_COPY | F.P2P, "lacks PRE_COPY, which PRE_COPY", "needs PRE_COPY"),
        (RU, PP, NO_P2P, "lacks P2P, which PRE_COPY_P2P", "PRE_COPY_P2P needs P2P,"),
        (RU, PP, F.STOP_COPY, "lacks P2P+PRE_COPY", "needs P2P+PRE_COPY"),
        (ST, RP, F.STOP_COPY, "lacks P2P, which RUNNING_P2P", "RUNNING_P2P needs P2P"),
        (SC, PC, ALL, "loop forever", "STOP_COPY -> PRE_COPY is a blocked arc"),
        (SC, PP, ALL, "loop forever", "STOP_COPY -> PRE_COPY_P2P is a blocked arc"),
        (ST, 8, ALL, "8 is not a migration state", "8 is out of range"),
        (RU, 2**32 - 1, ALL, "4294967295 is not a migration state", "out of range"),
    ],
)
def test_refusal_reasons(
    cur: DeviceState, new: int, flags: MigrationFlags, vfmig_says: str, kernel_says: str
) -> None:
    reason = fsm.vfmig_refusal(cur, new, flags)
    kernel = fsm.kernel_refusal(cur, new, flags)
    assert reason is not None
    assert vfmig_says in reason
    assert kernel is not None
    assert kernel_says in kernel
    result = fsm.plan(cur, new, flags)
    assert not result.allowed
    assert result.refusal == reason
    assert result.kernel.errno == errno.EINVAL


# --- the data session --------------------------------------------------------------------

#: vfio-migration.md §3 per arc: opened by entering the saving group or RESUMING from STOP,
#: reused inside the saving group, closed on leaving it or RESUMING.
ARC_EFFECTS = {
    (RU, PC): ArcEffect.OPENS_SAVING,
    (RP, PP): ArcEffect.OPENS_SAVING,
    (ST, SC): ArcEffect.OPENS_SAVING,
    (ST, RS): ArcEffect.OPENS_RESUMING,
    (PC, PP): ArcEffect.CONTINUES,
    (PP, PC): ArcEffect.CONTINUES,
    (PP, SC): ArcEffect.CONTINUES,
    (PC, SC): ArcEffect.CONTINUES,  # without P2P the skip loop makes this one arc
    (PC, RU): ArcEffect.ENDS,
    (PP, RP): ArcEffect.ENDS,
    (SC, ST): ArcEffect.ENDS,
    (RS, ST): ArcEffect.ENDS,
    (ST, RU): ArcEffect.NONE,  # without P2P
    (RU, ST): ArcEffect.NONE,  # without P2P
    (ST, RP): ArcEffect.NONE,
    (RP, ST): ArcEffect.NONE,
    (RU, RP): ArcEffect.NONE,
    (RP, RU): ArcEffect.NONE,
}


def test_arc_effect_of_every_arc() -> None:
    seen = set()
    for flags, cur, new in CASES:
        for arc in fsm.path(cur, new, flags).arcs:
            seen.add((arc.src, arc.dst))
            assert arc.effect is ARC_EFFECTS[(arc.src, arc.dst)], f"{show(flags, cur, new)} {arc}"
    assert seen == set(ARC_EFFECTS)
    for (src, dst), effect in ARC_EFFECTS.items():
        assert fsm.arc_effect(src, dst) is effect, f"{src.name}>{dst.name}"


#: The "driver must implement" lists in the comment atop vfio_mig_get_next_state().
P2P_ARCS = {(RU, RP), (RP, RU), (RP, ST), (ST, RP)}
BASE_ARCS = {(RS, ST), (ST, RS), (ST, SC), (SC, ST)}
DRIVER_ARCS = {
    F.STOP_COPY: BASE_ARCS | {(RU, ST), (ST, RU)},
    F.STOP_COPY | F.P2P: BASE_ARCS | P2P_ARCS,
    NO_P2P: BASE_ARCS | {(RU, ST), (ST, RU), (RU, PC), (PC, RU), (PC, SC)},
    ALL: BASE_ARCS
    | P2P_ARCS
    | {(PC, RU), (PC, PP), (PP, PC), (PP, RP), (PP, SC), (RU, PC), (RP, PP)},
}


@pytest.mark.parametrize("flags", fsm.FLAG_SETS, ids=fsm.flag_names)
def test_driver_arcs_are_the_kernel_comment_lists(flags: MigrationFlags) -> None:
    arcs = fsm.driver_arcs(flags)
    assert {(a.src, a.dst) for a in arcs} == DRIVER_ARCS[flags]
    assert len(arcs) == len(DRIVER_ARCS[flags])
    assert list(arcs) == sorted(arcs, key=lambda a: (a.src, a.dst))
    assert all(a.effect is fsm.arc_effect(a.src, a.dst) for a in arcs)
    used = {(a.src, a.dst) for _, c, n in CASES for a in fsm.path(c, n, flags).arcs}
    assert used == DRIVER_ARCS[flags]


@pytest.mark.parametrize(
    ("cur", "new", "flags", "opens"),
    [
        (RU, PC, ALL, ArcEffect.OPENS_SAVING),
        (RP, PP, ALL, ArcEffect.OPENS_SAVING),
        (ST, SC, ALL, ArcEffect.OPENS_SAVING),
        (RU, SC, ALL, ArcEffect.OPENS_SAVING),  # RP, ST, SC: the fd comes with the last arc
        (RS, PC, ALL, ArcEffect.OPENS_SAVING),
        (ST, RS, ALL, ArcEffect.OPENS_RESUMING),
        (RU, RS, ALL, ArcEffect.OPENS_RESUMING),  # measured: returns an fd
        (SC, RS, F.STOP_COPY, ArcEffect.OPENS_RESUMING),
        (PC, SC, ALL, None),  # data_fd -1: the same fd yields the rest
        (PC, PP, ALL, None),
        (SC, ST, ALL, None),
        (RS, RU, ALL, None),
        (RU, RP, ALL, None),
        (PC, PC, ALL, None),  # measured: ok, fd -1
        (SC, PC, ALL, None),  # refused
        (RU, PC, F.STOP_COPY, None),  # refused
    ],
    ids=lambda v: v.name if isinstance(v, DeviceState) else None,
)
def test_plan_opens(
    cur: DeviceState, new: DeviceState, flags: MigrationFlags, opens: ArcEffect | None
) -> None:
    result = fsm.plan(cur, new, flags)
    assert result.opens is opens
    assert (result.cur, result.target, result.flags) == (cur, new, flags)
    assert result.kernel == fsm.path(cur, new, flags)
    assert result.refusal == fsm.vfmig_refusal(cur, new, flags)
    assert result.allowed is (result.refusal is None)


def test_plan_opens_exactly_when_the_last_arc_opens() -> None:
    for flags, cur, new in CASES:
        result = fsm.plan(cur, new, flags)
        last = result.kernel.arcs[-1] if result.kernel.arcs else None
        enters = last is not None and last.dst in HAS_SESSION and last.src not in HAS_SESSION
        assert (result.opens is not None) is enters, show(flags, cur, new)


@pytest.mark.parametrize(
    ("before", "after", "survives"),
    [
        (PC, PP, True),
        (PC, SC, True),
        (PP, SC, True),
        (SC, SC, True),
        (RS, RS, True),
        (PC, RU, False),
        (SC, ST, False),
        (RS, ST, False),
        (RU, PC, False),  # a new session, not the old one
        (ST, RS, False),
        (RU, RU, False),  # there was none
        (ER, ER, False),
    ],
    ids=lambda v: v.name if isinstance(v, DeviceState) else None,
)
def test_session_survives(before: DeviceState, after: DeviceState, survives: bool) -> None:
    assert fsm.session_survives(before, after) is survives


def test_session_survives_every_partial_path() -> None:
    """A SET that fails part-way may leave the device at any state of the path."""
    for flags, cur, new in CASES:
        session = cur in HAS_SESSION
        for arc in fsm.path(cur, new, flags).arcs:
            session = session and arc.effect is ArcEffect.CONTINUES
            assert fsm.session_survives(cur, arc.dst) is session, f"{show(flags, cur, new)} {arc}"


# --- random request sequences ------------------------------------------------------------


class Device:
    """A device stepping through plans arc by arc, with a session counter for the data fd."""

    def __init__(self, flags: MigrationFlags, state: DeviceState) -> None:
        self.flags = flags
        self.state = state
        self.session: int | None = 0 if state in HAS_SESSION else None
        self.sessions_opened = 0

    def step(self, arc: fsm.Arc) -> None:
        assert arc.src is self.state
        if arc.effect in (ArcEffect.OPENS_SAVING, ArcEffect.OPENS_RESUMING):
            assert self.session is None, f"{arc} opens a second session"
            self.sessions_opened += 1
            self.session = self.sessions_opened
        elif arc.effect is ArcEffect.CONTINUES:
            assert self.session is not None, f"{arc} continues no session"
        elif arc.effect is ArcEffect.ENDS:
            assert self.session is not None, f"{arc} ends no session"
            self.session = None
        else:
            assert self.session is None, f"{arc} leaves a session behind"
        self.state = arc.dst
        assert has(self.state, self.flags), f"{arc} reaches a state the device lacks"
        assert (self.session is not None) is (self.state in HAS_SESSION), str(arc)


requests = st.lists(
    st.tuples(st.integers(0, fsm.NUM_STATES + 1), st.integers(0, 5)), min_size=1, max_size=30
)


@given(
    flags=st.sampled_from(fsm.FLAG_SETS),
    start=st.sampled_from([ST, RU, RS, SC]),
    requests=requests,
)
def test_random_allowed_requests_keep_the_device_and_session_consistent(
    flags: MigrationFlags, start: DeviceState, requests: list[tuple[int, int]]
) -> None:
    """Each request either is refused (nothing changes) or walks its arcs, maybe failing
    after ``fail_after`` arcs; session_survives must tell from the states alone."""
    device = Device(flags, start)
    for target, fail_after in requests:
        before, session = device.state, device.session
        result = fsm.plan(before, target, flags)
        if not result.allowed:
            assert result.kernel.errno == errno.EINVAL
            assert result.kernel.arcs == ()
            assert (device.state, device.session) == (before, session)
            continue
        assert result.kernel.errno is None
        done = result.kernel.arcs[:fail_after]
        for arc in done:
            device.step(arc)
        if len(done) == len(result.kernel.arcs):
            assert device.state == target
            opened = device.session is not None and device.session != session
            assert (result.opens is not None) is opened
        same = session is not None and device.session == session
        assert fsm.session_survives(before, device.state) is same


def test_flag_names() -> None:
    assert fsm.flag_names(ALL) == "STOP_COPY+P2P+PRE_COPY"
    assert fsm.flag_names(F.STOP_COPY | F.P2P) == "STOP_COPY+P2P"
    assert fsm.flag_names(F(0)) == "none"


def test_arc_and_kernel_path_render() -> None:
    result = fsm.path(RU, SC, ALL)
    assert [str(a) for a in result.arcs] == [
        "RUNNING>RUNNING_P2P",
        "RUNNING_P2P>STOP",
        "STOP>STOP_COPY",
    ]
    assert result.states == (RP, ST, SC)
