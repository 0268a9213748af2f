"""What a sweep shows while it runs: a live rich table, or one plain line per change.

The live view is a :class:`rich.live.Live` display, redrawn every quarter second: counts
of queued / running / finished / failed / killed trials, the best value of the chosen
metric, and a row per trial (status, duration, latest metric value, run id). It is used
when the console is a terminal or a Jupyter notebook; anything else (a pipe, a CI log)
gets one plain line per trial status change. Both end with one summary table (the live
view's last frame is the summary), and with the reasons of the trials that did not
finish.

Renderables are built on the event loop from the sweep's state; writing them to the
console (which can block on a slow terminal) happens in a worker thread.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread

from aioproj._redact import redact_url

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table

    from aioproj.sweeps.engine import Sweep
    from aioproj.sweeps.trials import TrialState

__all__ = ["ProgressMode", "show_progress"]

logger = logging.getLogger("aioproj")

ProgressMode = Literal["auto", "live", "lines"]

_STYLES = {
    "QUEUED": "dim",
    "STARTING": "cyan",
    "RUNNING": "bold cyan",
    "RETRYING": "yellow",
    "FINISHED": "green",
    "FAILED": "bold red",
    "KILLED": "magenta",
    "SKIPPED": "dim",
}
#: Rows of the live table: the running trials, then the latest ended ones.
_MAX_ROWS = 20
_REFRESH = 0.25


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(value), 60)
    return f"{minutes}m{seconds:02d}s"


def _metric(state: TrialState, metric: str | None) -> str:
    if metric is None or metric not in state.metrics:
        return "-"
    return f"{state.metrics[metric]:.6g}"


def counts(sweep: Sweep) -> dict[str, int]:
    """Trials by status, for the header line and the summary."""
    tally = collections.Counter(t.status for t in sweep.trials)
    running = tally["STARTING"] + tally["RUNNING"] + tally["RETRYING"]
    queued = tally["QUEUED"]
    if sweep.total is not None:
        queued += max(sweep.total - len(sweep.trials), 0)
    return {
        "queued": queued,
        "running": running,
        "finished": tally["FINISHED"],
        "failed": tally["FAILED"],
        "killed": tally["KILLED"],
    }


def header(sweep: Sweep) -> str:
    """One line: the counts and the best value so far."""
    parts = [f"{name} {number}" for name, number in counts(sweep).items()]
    line = "  ".join(parts)
    best = sweep.best
    if best is not None and sweep.metric is not None:
        line += (
            f"  | best {sweep.metric}={best.metrics[sweep.metric]:.6g} "
            f"(trial {best.index}, {_params_text(dict(best.params))})"
        )
    return line


def _table(sweep: Sweep, rows: list[TrialState], title: str | None = None) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left", expand=False, pad_edge=False)
    table.add_column("trial", justify="right")
    table.add_column("status")
    table.add_column("parameters")
    table.add_column("time", justify="right")
    table.add_column(sweep.metric or "metric", justify="right")
    table.add_column("run id")
    table.add_column("note", overflow="ellipsis", max_width=60)
    for state in rows:
        table.add_row(
            str(state.index),
            f"[{_STYLES.get(state.status, '')}]{state.status}[/]",
            _params_text(state.params),
            _seconds(state.duration),
            _metric(state, sweep.metric),
            (state.run_id or "-")[:12],
            state.note,
        )
    return table


def title(sweep: Sweep) -> str:
    """The first line: the project and the parent run."""
    text = f"aioproj sweep {redact_url(sweep.uri)}"
    if sweep.parent_run_id:
        text += f"  (parent run {sweep.parent_run_id})"
    return text


def live_renderable(sweep: Sweep) -> RenderableType:
    """The live view: the header and the rows that matter now."""
    from rich.console import Group
    from rich.text import Text

    active = [t for t in sweep.trials if t.status in ("STARTING", "RUNNING", "RETRYING")]
    ended = [t for t in sweep.trials if t.is_done]
    ended.sort(key=lambda t: t.ended or 0.0)
    room = max(_MAX_ROWS - len(active), 0)
    rows = sorted(active, key=lambda t: t.index) + (ended[-room:][::-1] if room else [])
    hidden = len(active) + len(ended) - len(rows)
    parts: list[RenderableType] = [
        Text(title(sweep), style="bold"),
        Text(header(sweep)),
        *(Text(notice, style="yellow") for notice in sweep.notices),
        _table(sweep, rows[:_MAX_ROWS]),
    ]
    if hidden > 0:
        parts.append(Text(f"... {hidden} more ended trials", style="dim"))
    return Group(*parts)


def summary_renderable(sweep: Sweep) -> RenderableType:
    """The final table: every trial that ran, best first when there is a metric."""
    from rich.console import Group
    from rich.text import Text

    ran = [t for t in sweep.trials if t.status not in ("QUEUED", "SKIPPED")]
    if sweep.metric is not None:
        metric = sweep.metric
        sign = 1.0 if sweep.goal == "min" else -1.0

        def key(t: TrialState) -> tuple[int, float, int]:
            ok = t.status == "FINISHED" and metric in t.metrics
            return (0 if ok else 1, sign * t.metrics[metric] if ok else 0.0, t.index)

        ran.sort(key=key)
    parts: list[RenderableType] = [
        Text(f"Sweep {sweep.status.value}: {header(sweep)}", style="bold"),
        _table(sweep, ran),
    ]
    parts.extend(Text(line, style="red") for line in reasons(sweep))
    parts.extend(Text(notice, style="yellow") for notice in sweep.notices)
    skipped = sum(t.status == "SKIPPED" for t in sweep.trials)
    if skipped:
        parts.append(Text(f"{skipped} trials were not started (fail-fast).", style="dim"))
    if sweep.parent_run_id:
        parts.append(Text(f"Parent run: {sweep.parent_run_id}", style="dim"))
    return Group(*parts)


#: Trials, and lines of each, whose reasons the summary shows.
_REASONS_SHOWN = 10
_REASON_LINES = 5


def reasons(sweep: Sweep) -> list[str]:
    """Why trials failed or were killed, a few lines each, for the summary. Trials the
    sweep itself stopped (Ctrl-C, fail-fast) are counted, not repeated."""
    why = [
        t
        for t in sorted(sweep.trials, key=lambda t: t.index)
        if t.status in ("FAILED", "KILLED") and t.reason and not t.reason.startswith(_OURS)
    ]
    lines = []
    for state in why[:_REASONS_SHOWN]:
        lines.append(f"trial {state.index} {state.status}:")
        lines.extend(f"    {line}" for line in state.reason.splitlines()[-_REASON_LINES:])
    if len(why) > _REASONS_SHOWN:
        lines.append(f"... and {len(why) - _REASONS_SHOWN} more (see their runs' reason tags)")
    return lines


#: The reasons of trials the sweep stopped itself.
_OURS = ("the sweep was stopped", "stopped: trial")


def _line(sweep: Sweep, state: TrialState) -> str:
    text = f"[trial {state.index}] {state.status}"
    if state.status in ("STARTING", "RUNNING"):
        text += f" {_params_text(state.params)}"
        if state.run_id:
            text += f" run {state.run_id}"
    elif state.is_done:
        text += f" in {_seconds(state.duration)}"
        if sweep.metric is not None and sweep.metric in state.metrics:
            text += f" {sweep.metric}={state.metrics[sweep.metric]:.6g}"
        if state.run_id:
            text += f" run {state.run_id}"
    if state.note:
        text += f" ({state.note})"
    return text


def make_console(mode: ProgressMode) -> tuple[Console, bool]:
    """A console on stdout, and whether to draw the live view on it."""
    from rich.console import Console

    console = Console(highlight=False)
    if not (console.is_terminal or console.is_jupyter):
        # A log file or pipe: long lines rather than rich's default of 80 columns.
        console = Console(highlight=False, width=max(console.width, 160))
    if mode == "auto":
        live = console.is_terminal or (console.is_jupyter and _has_widgets())
        return console, live
    return console, mode == "live"


def _has_widgets() -> bool:
    """rich draws a live display in Jupyter through ipywidgets; without it, plain lines."""
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


async def show_progress(sweep: Sweep, finished: anyio.Event, mode: ProgressMode) -> None:
    """Show ``sweep`` until ``finished`` is set, then its summary.

    Cancellation: the display is closed and the summary printed (shielded, after the
    sweep has recorded its end or a bounded wait) before the cancellation propagates.
    """
    try:
        console, live = await anyio.to_thread.run_sync(make_console, mode)
        if live:  # its last frame is the summary
            await _live(sweep, finished, console)
            return
        try:
            await _lines(sweep, finished, console)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(60):
                await finished.wait()
                await _output(console, console.print, summary_renderable(sweep))
    except Exception:  # a broken display must not break the sweep
        logger.exception("The sweep's progress display failed")


async def _output(console: Console, func: Callable[..., object], *args: Any) -> None:
    """Write to the console: in a worker thread (a terminal or pipe can block), except in
    Jupyter, whose display messages must come from the kernel's own thread."""
    if console.is_jupyter:
        func(*args)
    else:
        await anyio.to_thread.run_sync(func, *args)


def _redraw(display: Any, renderable: RenderableType, refresh: bool = True) -> None:
    display.update(renderable, refresh=refresh)


async def _live(sweep: Sweep, finished: anyio.Event, console: Console) -> None:
    from rich.live import Live

    display = Live(
        live_renderable(sweep),
        console=console,
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
        vertical_overflow="visible",
    )
    await _output(console, display.start)
    try:
        while not finished.is_set():
            await _output(console, _redraw, display, live_renderable(sweep))
            with anyio.move_on_after(_REFRESH):
                await finished.wait()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(60):
            await finished.wait()
        with anyio.CancelScope(shield=True):  # the last frame: the summary, drawn once
            # (by stop() on a terminal; Jupyter's stop() does not draw)
            summary = summary_renderable(sweep)
            await _output(console, _redraw, display, summary, console.is_jupyter)
            await _output(console, display.stop)


async def _lines(sweep: Sweep, finished: anyio.Event, console: Console) -> None:
    pending: list[str] = []
    wake = anyio.Event()
    last: dict[int, tuple[str, str | None]] = {}

    def on_change(state: TrialState) -> None:
        nonlocal wake
        seen = (state.status, state.run_id)
        if state.status == "STARTING" or last.get(state.index) == seen:
            return
        last[state.index] = seen
        pending.append(_line(sweep, state))
        wake.set()

    def write(lines: list[str]) -> None:
        for line in lines:
            console.out(line, highlight=False)
        console.file.flush()

    titled, told = False, 0

    def news() -> None:
        """The title once the parent run exists, and each new notice."""
        nonlocal titled, told
        if not titled and sweep.parent_run_id:
            titled = True
            total = "?" if sweep.total is None else sweep.total
            pending.insert(0, f"{title(sweep)}: {total} trials")
        while told < len(sweep.notices):
            pending.append(f"WARNING {sweep.notices[told]}")
            told += 1

    sweep._subscribe(on_change)
    for state in list(sweep.trials):  # those that ended before (kept by a resume)
        if state.is_done:
            on_change(state)
    try:
        while True:
            done = finished.is_set()
            news()
            if pending:
                batch, pending[:] = list(pending), []
                with anyio.CancelScope(shield=True):
                    await _output(console, write, batch)
            if done:
                return
            wake = anyio.Event()
            with anyio.move_on_after(_REFRESH):
                await wake.wait()
    finally:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(60):
                await finished.wait()  # the KILLED lines of a cancelled sweep come last
            if pending:
                await _output(console, write, list(pending))
