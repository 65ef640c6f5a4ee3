"""The progress display of a migration: live bars on a terminal, plain lines elsewhere, a summary.

Interface (for the engine / ``vfmig migrate``)
----------------------------------------------
::

    display = ProgressDisplay(env, live=env.stdout_isatty, names={source(0): "sim:src", ...})
    with display:                       # __exit__ calls close() if nobody did
        ...
        display.handle(event)           # every event of vfmig.core.events, in order
        display.handle(event, at_ns=t)  # with the journal's monotonic time, if known
        ...
        display.close()                 # stops the bars, prints the summary

* ``handle(event, at_ns=None)`` takes any :class:`vfmig.core.events.Event`; events it has
  no use for are ignored. ``at_ns`` is the event's monotonic time in nanoseconds; without
  it the display stamps the event with ``time.monotonic_ns()`` on arrival. Rates, ETAs and
  the summary are computed from these times, so a replayed journal gives the same figures.
  It never blocks and never raises for a well-formed event; call it from one task.
* ``close(summary=None)`` prints the summary: per device and per phase the time, raw and
  wire bytes, compression ratio and throughput, and the downtime cut into its parts. By
  default the summary is the display's own fold of the events it saw
  (:func:`vfmig.core.events.tally`); pass a :class:`~vfmig.core.events.Summary` to show
  another (a merged multi-host journal's). Idempotent.
* ``names`` maps a :class:`~vfmig.core.model.DeviceId` to what the user typed (its spec);
  a spec is shown without its options (``src0 sim:src@10.0.0.2:7300``). Without it
  devices show as ``src0``, ``dst0``.
* Feed it every event: it adds up the chunks itself, so an event it misses (a lossy bus
  subscription that lagged) makes its live figures low; the summary is then best taken
  from a complete fold and passed to ``close(summary)``.

Theory of operation
-------------------
Each pair ``src<i> -> dst<i>`` is one row. Its *sent* count is the sum of ``ChunkSent.raw``
(and ``.wire``). Its *expected end* estimates the stream's length as the bytes sent so far
plus what the source says it still has, renewed at each sample: the precopy
``initial + dirty`` (``PrecopySampled``) while precopy runs; MIG_DATA_SIZE
(``DeviceOpened.data_size``, ``DataSizeSampled``) for a run without precopy and, as the
stop-copy size, once stop-copy starts. Between samples it stays fixed, so the bar moves;
it is never below the bytes already sent, and it is exact at the source's end of stream.
Throughput is measured over the last :data:`RATE_WINDOW_NS` of chunk times; ETA is the
remaining estimate over that rate.

``live=True`` draws rich progress bars (rich ships with textual; textual itself is never
imported here). They are redrawn from :meth:`handle`, at most :data:`REFRESH_PER_S` times a
second of event time: no thread of its own. Phase changes, decisions and errors are printed
above the bars. ``live=False`` prints plain lines instead: one per phase change, decision
and error, at most one progress line per pair every :data:`LINE_INTERVAL_NS`, and one
more when a stream ends or its digest is checked.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Self

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from vfmig.core.errors import SpecError, errno_name
from vfmig.core.events import (
    ChunkSent,
    DataSizeSampled,
    DecisionMade,
    DeviceHung,
    DeviceOpened,
    ErrorRaised,
    PhaseChanged,
    PrecopySampled,
    RunFinished,
    StreamEnded,
    Tally,
    summarize,
    tally,
)
from vfmig.core.model import DeviceId, Phase, Role
from vfmig.core.spec import Options, parse_spec

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType

    from vfmig.cli.context import Environment
    from vfmig.core.events import Downtime, Event, Summary, Transfer

NS_PER_S: Final = 1_000_000_000
#: Throughput is measured over the chunks of this much recent (event) time.
RATE_WINDOW_NS: Final = 2 * NS_PER_S
#: Plain mode: at most one progress line per pair this often.
LINE_INTERVAL_NS: Final = NS_PER_S
#: Live mode: at most this many redraws per second of event time.
REFRESH_PER_S: Final = 8
#: Phases in which the precopy figures are current (afterwards they are stale).
_PRECOPY_PHASES: Final = (Phase.SETUP, Phase.PRECOPY)
#: Width of the plain (non-terminal) output, where there is no terminal to ask.
PLAIN_WIDTH: Final = 120


def human_size(size: float) -> str:
    """``512 B``, ``1.5 KiB``, ``230.0 MiB``: binary units, one decimal."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{human_size(rate)}/s"


def human_time(ns: int | float) -> str:
    """``0.85 ms``, ``42 ms``, ``3.21 s``, ``2m05s``."""
    if ns < 1_000_000:
        return f"{ns / 1_000_000:.2f} ms"
    if ns < NS_PER_S:
        return f"{ns / 1_000_000:.0f} ms"
    seconds = ns / NS_PER_S
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def short_name(name: str) -> str:
    """A device spec without its options (``sim:src@host:7300``); other names as given."""
    try:
        spec = parse_spec(name)
    except SpecError:
        return name
    return str(dataclasses.replace(spec, options=Options()))


def human_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


@dataclass(slots=True)
class _Pair:
    """What one row shows: a source's stream towards its destination."""

    index: int
    data_size: int | None = None  #: latest MIG_DATA_SIZE of the source
    initial: int | None = None  #: latest precopy initial_bytes
    dirty: int | None = None  #: latest precopy dirty_bytes
    raw: int = 0
    wire: int = 0
    expected_end: int | None = None
    drained: bool = False  #: the source read end of stream
    verified: bool | None = None  #: the destination's digest check (None: not yet)
    samples: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)

    def expect(self, remaining: int | None) -> None:
        """The source still has ``remaining`` bytes to send, as of now."""
        if remaining is not None:
            self.expected_end = self.raw + remaining

    @property
    def total(self) -> int | None:
        if self.drained:
            return self.raw
        return None if self.expected_end is None else max(self.expected_end, self.raw)

    def rate(self) -> float | None:
        """Bytes per second over the recent window; None before two chunk times."""
        if len(self.samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) * NS_PER_S / (t1 - t0) if t1 > t0 else None

    def eta_ns(self) -> int | None:
        total, rate = self.total, self.rate()
        if total is None or total <= self.raw or not rate:
            return None
        return int((total - self.raw) / rate * NS_PER_S)

    def add_chunk(self, at_ns: int, raw: int, wire: int) -> None:
        self.raw += raw
        self.wire += wire
        self.samples.append((at_ns, self.raw))
        while len(self.samples) > 2 and self.samples[1][0] <= at_ns - RATE_WINDOW_NS:
            self.samples.popleft()


class ProgressDisplay:
    """Shows a migration's events as they happen and its summary at the end (module docstring)."""

    def __init__(
        self,
        env: Environment,
        *,
        live: bool,
        names: Mapping[DeviceId, str] | None = None,
        console: Console | None = None,
    ) -> None:
        self.live = live
        self.names = dict(names or {})
        if console is None:
            if live:
                # emoji=False: device names such as 'sim:a:b' must not turn into emoji codes.
                console = Console(file=env.stdout, force_terminal=True, emoji=False)
            else:
                console = Console(
                    file=env.stdout,
                    force_terminal=False,
                    no_color=True,
                    highlight=False,
                    emoji=False,
                    width=PLAIN_WIDTH,
                )
        self.console = console
        self._tally = Tally()
        self._pairs: dict[int, _Pair] = {}
        self._phase: Phase | None = None
        self._first_ns: int | None = None
        self._next_line_ns = 0
        self._next_refresh_ns = 0
        self._closed = False
        self._live: Live | None = None
        if live:
            self._live = Live(
                Group(),
                console=console,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()

    # --- names and lines ---------------------------------------------------------------

    def name(self, dev: DeviceId) -> str:
        given = self.names.get(dev)
        return f"{dev} {short_name(given)}" if given else str(dev)

    def _say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _stamp(self, at_ns: int) -> str:
        start = self._first_ns if self._first_ns is not None else at_ns
        return f"[{(at_ns - start) / NS_PER_S:6.1f}s]"

    def _pair(self, dev: DeviceId) -> _Pair:
        pair = self._pairs.get(dev.index)
        if pair is None:
            pair = self._pairs[dev.index] = _Pair(dev.index)
            src, dst = DeviceId(Role.SOURCE, dev.index), DeviceId(Role.DESTINATION, dev.index)
            if src in self.names or dst in self.names:
                self._say(f"pair {dev.index}: {self.name(src)} -> {self.name(dst)}")
        return pair

    # --- events ------------------------------------------------------------------------

    def handle(self, event: Event, at_ns: int | None = None) -> None:
        """Take one event (see the module docstring); ``at_ns`` defaults to now."""
        if self._closed:
            return
        now = time.monotonic_ns() if at_ns is None else at_ns
        if self._first_ns is None:
            self._first_ns = now
        self._tally = tally(self._tally, now, event)
        match event:
            case (
                DeviceOpened(device=dev, data_size=size) | DataSizeSampled(device=dev, size=size)
            ) if dev.role is Role.SOURCE:
                pair = self._pair(dev)
                pair.data_size = size
                if pair.initial is None:
                    pair.expect(size)
            case PrecopySampled(device=dev, initial=initial, dirty=dirty):
                pair = self._pair(dev)
                pair.initial, pair.dirty = initial, dirty
                pair.expect(initial + dirty)
            case ChunkSent(device=dev, raw=raw, wire=wire, final=final):
                pair = self._pair(dev)
                pair.add_chunk(now, raw, wire)
                if final and not pair.drained:
                    pair.drained = True
                    self._next_line_ns = now  # a line for the end of every stream
            case StreamEnded(device=dev, digest_ok=ok):
                self._pair(dev).verified = ok
                self._next_line_ns = now
            case PhaseChanged(phase=phase):
                self._phase = phase
                if phase is Phase.STOPCOPY:
                    for pair in self._pairs.values():
                        pair.expect(pair.data_size)  # the stop-copy size, as last sampled
                self._say(f"{self._stamp(now)} phase {phase.value}")
            case DecisionMade(rule=rule, text=text):
                self._say(f"{self._stamp(now)} decision {rule}: {text}")
            case ErrorRaised():
                self._error(now, event)
            case DeviceHung(device=dev, step=step, state=state, target=target):
                where = f" (last state {state.name})" if state is not None else ""
                towards = f" towards {target.name}" if target is not None else ""
                self._say(f"{self._stamp(now)} HUNG {self.name(dev)}: {step}{towards}{where}")
            case RunFinished(summary=text):
                self._say(f"{self._stamp(now)} {text}")
        self._show(now)

    def _error(self, now: int, event: ErrorRaised) -> None:
        who = f"{self.name(event.device)}: " if event.device is not None else ""
        code = f" ({errno_name(event.errno)})" if event.errno is not None else ""
        self._say(f"{self._stamp(now)} error {who}{event.step}: {event.message}{code}")
        if event.hint:
            self._say(f"{' ' * len(self._stamp(now))} hint: {event.hint}")

    # --- progress ----------------------------------------------------------------------

    def _state(self, pair: _Pair) -> str:
        if pair.verified is not None:
            return "verified" if pair.verified else "BAD DIGEST"
        if pair.drained:
            return "drained"
        return self._phase.value if self._phase is not None else ""

    def _detail(self, pair: _Pair) -> str:
        total = pair.total
        sent = human_size(pair.raw)
        parts = [f"{sent} of ~{human_size(total)}" if total is not None else f"{sent} sent"]
        parts.append(f"wire {human_size(pair.wire)} ({human_ratio(_ratio(pair))})")
        parts.append(human_rate(pair.rate()))
        if pair.initial is not None and self._phase in _PRECOPY_PHASES:
            initial = human_size(pair.initial)
            parts.append(f"precopy initial {initial} dirty {human_size(pair.dirty or 0)}")
        eta = pair.eta_ns()
        if eta is not None:
            parts.append(f"ETA {human_time(eta)}")
        return ", ".join(parts)

    def _show(self, now: int) -> None:
        if self._live is not None:
            if now >= self._next_refresh_ns:
                self._next_refresh_ns = now + NS_PER_S // REFRESH_PER_S
                self._live.update(self._bars(), refresh=True)
            return
        if now < self._next_line_ns or not any(p.raw for p in self._pairs.values()):
            return
        self._next_line_ns = now + LINE_INTERVAL_NS
        for index in sorted(self._pairs):
            pair = self._pairs[index]
            src = self.name(DeviceId(Role.SOURCE, index))
            percent = f" {pair.raw * 100 // pair.total:3d}%" if pair.total else ""
            state = f"{self._state(pair):<8}"
            line = f"{self._stamp(now)} {state}{percent} {src}: {self._detail(pair)}"
            self._say(line)

    def _bars(self) -> Group:
        """Two lines per pair: a bar with the bytes, then rate, ETA, wire bytes and precopy."""
        rows: list[Table | Text] = []
        for index in sorted(self._pairs):
            pair = self._pairs[index]
            total = pair.total
            head = Table.grid(padding=(0, 1))
            head.add_column(no_wrap=True)
            head.add_column(width=10, no_wrap=True)
            head.add_column(ratio=1, min_width=10)
            head.add_column(justify="right", width=4, no_wrap=True)
            head.add_column(no_wrap=True)
            percent = f"{pair.raw * 100 // total}%" if total else ""
            amount = human_size(pair.raw) + (f" of ~{human_size(total)}" if total else "")
            bar = ProgressBar(total=float(total) if total else None, completed=float(pair.raw))
            head.add_row(f"src{index} -> dst{index}", self._state(pair), bar, percent, amount)
            rows.append(head)
            facts = [human_rate(pair.rate())]
            eta = pair.eta_ns()
            if eta is not None:
                facts.append(f"ETA {human_time(eta)}")
            facts.append(f"wire {human_size(pair.wire)} ({human_ratio(_ratio(pair))})")
            if pair.initial is not None and self._phase in _PRECOPY_PHASES:
                facts.append(
                    f"initial {human_size(pair.initial)}, dirty {human_size(pair.dirty or 0)}"
                )
            rows.append(Text("  " + ", ".join(facts), no_wrap=False))
        return Group(*rows)

    # --- the end -----------------------------------------------------------------------

    @property
    def summary(self) -> Summary:
        """The summary of the events handled so far."""
        return summarize(self._tally)

    def close(self, summary: Summary | None = None) -> None:
        """Stop the bars and print the summary (the display's own unless one is given)."""
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            self._live.update(self._bars(), refresh=True)
            self._live.stop()
        pieces = render_summary(summary or self.summary, self.name, ascii=not self.live)
        for renderable in pieces:
            self.console.print(renderable, markup=False, highlight=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _ratio(pair: _Pair) -> float | None:
    return pair.raw / pair.wire if pair.wire else None


def _transfer_row(label: str, t: Transfer) -> tuple[str, ...]:
    moved = t.raw_bytes > 0
    return (
        label,
        human_time(t.time_ns),
        human_size(t.raw_bytes) if moved else "-",
        human_size(t.wire_bytes) if moved else "-",
        human_ratio(t.ratio),
        human_rate(t.throughput) if moved else "-",
    )


#: ``box.SIMPLE_HEAD`` in ASCII: a rule under the header and nothing else (for plain output).
ASCII_HEAD: Final = box.Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)


def _table(first: str, columns: tuple[str, ...], rows: list[tuple[str, ...]], ascii: bool) -> Table:
    table = Table(box=ASCII_HEAD if ascii else box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column(first)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


_TRANSFER_COLUMNS: Final = ("time", "raw", "wire", "ratio", "throughput")

#: Downtime parts in order, with the names the summary shows.
DOWNTIME_PARTS: Final = (
    ("quiesce", "quiesce_ns"),
    ("stop-copy drain", "drain_ns"),
    ("transfer", "transfer_ns"),
    ("resume write", "resume_write_ns"),
    ("validation", "validation_ns"),
    ("start", "start_ns"),
)


def _downtime_rows(downtime: Downtime) -> list[tuple[str, ...]]:
    total = downtime.total_ns
    rows: list[tuple[str, ...]] = []
    for label, attribute in DOWNTIME_PARTS:
        value: int = getattr(downtime, attribute)
        share = f"{value * 100 / total:.0f}%" if total else "-"
        rows.append((label, human_time(value), share))
    return rows


def render_summary(
    summary: Summary, name: Callable[[DeviceId], str], *, ascii: bool = False
) -> list[str | Table]:
    """The summary as printable pieces: a headline, then titled tables (devices, phases,
    downtime). ``ascii`` draws the tables' rules with ``-`` instead of box characters."""
    outcome = summary.outcome.value if summary.outcome is not None else "unfinished"
    pieces: list[str | Table] = [f"{outcome} in {human_time(summary.total_ns)}"]
    devices = sorted(
        summary.devices.items(),
        key=lambda item: (item[0].index, item[0].role is Role.DESTINATION),
    )
    if devices:
        rows = [_transfer_row(name(dev), t) for dev, t in devices]
        pieces += ["", "stream per device", _table("device", _TRANSFER_COLUMNS, rows, ascii)]
    phases = [(phase, summary.phases[phase]) for phase in Phase if phase in summary.phases]
    if phases:
        rows = [_transfer_row(p.value, t) for p, t in phases]
        pieces += ["", "phases", _table("phase", _TRANSFER_COLUMNS, rows, ascii)]
    downtime = summary.downtime
    if downtime is not None:
        rows = _downtime_rows(downtime)
        pieces += [
            "",
            f"downtime {human_time(downtime.total_ns)}",
            _table("part", ("time", "share"), rows, ascii),
        ]
    return pieces
