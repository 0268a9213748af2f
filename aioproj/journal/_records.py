"""The journal's records, and how a log of them folds into what each run went through.

A journal is a file of JSON lines. The first is the driver's header; every other line is
one fact about one run, named by the run's journal key (``k``)::

    {"op": "driver", "id": ..., "pid": ..., "t": ...}
    {"op": "intent", "k": ..., "uri": ..., "backend": ..., "exp": ..., "t": ...}
                                                     before anything of the run exists
    {"op": "tracked", "k": ..., "run": ...}          the tracking run exists
    {"op": "started", "k": ..., "state": {...}}      the process / remote run exists
    {"op": "ended", "k": ..., "status": ..., "end": ...}   the final status, being recorded
    {"op": "kept", "k": ...}                         tracking refused it: kept for recover
    {"op": "done", "k": ...}                         the final status is recorded
    {"op": "void", "k": ...}                         nothing was created after all
    {"op": "exit", "k": ..., "rc": ..., "t": ...}    written by a local run's own shell

Everything here is pure: no I/O, so recovery decisions are tested directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RunState",
    "encode",
    "fold",
    "parse_lines",
    "record_exit",
]

#: The journal format; a reader skips files of another version.
VERSION = 2


def encode(record: Mapping[str, Any]) -> bytes:
    """One record as a line of compact JSON (non-ASCII escaped: a line is plain bytes)."""
    return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


def parse_lines(data: bytes) -> list[dict[str, Any]]:
    """The records of a journal file; torn or foreign lines are skipped.

    A driver killed in the middle of a write leaves at most one partial last line, and a
    run's shell may append a line of its own: neither stops the rest from being read.
    """
    out = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("op"), str):
            out.append(record)
    return out


@dataclass
class RunState:
    """Everything the journal says about one run, folded from its records."""

    key: str
    #: "run", or "sweep" for the parent run of a sweep (no process of its own).
    kind: str = "run"
    tracking_uri: str = field(default="", repr=False)  # may carry a database password
    backend: str = ""
    experiment_id: str = ""
    #: The tracking run, once known (a given ``run_id`` is known from the intent on).
    run_id: str | None = None
    intent_ms: int = 0
    #: What the backend needs to find the run again (local: ``pgid``; remote: job ids).
    state: dict[str, Any] = field(default_factory=dict)
    started: bool = False
    #: The final status the driver saw, and when the run ended.
    status: str | None = None
    end_ms: int | None = None
    #: Tracking refused the final status: ``aioproj recover`` replays it, even while
    #: the driver lives.
    kept: bool = False
    #: The exit code and end time the run's shell wrote itself (local runs).
    exit_code: int | None = None
    exit_ms: int | None = None
    #: The final status is recorded (or nothing was ever created): nothing left to do.
    done: bool = False


def _ms(value: object) -> int | None:
    """Milliseconds from an int, or from the shell's ``$EPOCHREALTIME`` seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value:
        try:
            return int(float(value.replace(",", ".")) * 1000)
        except ValueError:
            return None
    return None


def _apply(run: RunState, record: Mapping[str, Any]) -> None:
    op = record["op"]
    if op == "intent":
        run.kind = str(record.get("kind") or "run")
        run.tracking_uri = str(record.get("uri") or "")
        run.backend = str(record.get("backend") or "")
        run.experiment_id = str(record.get("exp") or "")
        run.intent_ms = _ms(record.get("t")) or 0
        if isinstance(record.get("run"), str):
            run.run_id = record["run"]
        if isinstance(record.get("state"), dict):
            run.state.update(record["state"])
    elif op == "tracked" and isinstance(record.get("run"), str):
        run.run_id = record["run"]
    elif op == "started":
        run.started = True
        if isinstance(record.get("state"), dict):
            run.state.update(record["state"])
    elif op == "ended" and isinstance(record.get("status"), str):
        run.status = record["status"]
        run.end_ms = _ms(record.get("end"))
    elif op == "kept":
        run.kept = True
    elif op == "exit" and isinstance(record.get("rc"), int):
        run.exit_code = record["rc"]
        run.exit_ms = _ms(record.get("t"))
    elif op in ("done", "void"):
        run.done = True


def fold(records: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, RunState]]:
    """The header and the state of every run a journal's records describe, in order.

    Records of a key that never had an intent (a shell's exit line of a run whose intent
    was compacted away) describe no run and are dropped.
    """
    header: dict[str, Any] | None = None
    runs: dict[str, RunState] = {}
    for record in records:
        if record.get("op") == "driver":
            header = dict(record)
            continue
        key = record.get("k")
        if not isinstance(key, str):
            continue
        run = runs.get(key)
        if run is None:
            if record.get("op") != "intent":
                continue
            run = runs[key] = RunState(key)
        _apply(run, record)
    return header, runs


def record_exit(command: str, journal_path: str, key: str) -> str:
    """``command`` as a shell script that appends its exit code and end time to the
    journal once it has run (an ``exit`` record).

    The run's shell writes it itself, so a run that ends after its driver died still
    has its true outcome on record. The command runs in a subshell, so an ``exit`` in it
    ends only the subshell and is recorded too; a shell killed by a signal (a cancelled
    run) dies before it writes anything. ``printf`` is a builtin (no process) and
    ``$EPOCHREALTIME`` a bash variable (empty in other shells: the end time is then
    unknown). The exit code of the script is the command's.
    """
    import shlex

    line = '{"op":"exit","k":"%s","rc":%d,"t":"%s"}\\n'
    return (
        f"(\n{command}\n)\n"
        "__aioproj_rc=$?\n"
        f'printf {shlex.quote(line)} {shlex.quote(key)} "$__aioproj_rc" "$EPOCHREALTIME"'
        f" >> {shlex.quote(journal_path)} 2>/dev/null\n"
        'exit "$__aioproj_rc"'
    )
