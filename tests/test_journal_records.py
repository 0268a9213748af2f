"""The journal's pure parts: records fold into each run's state, and every state a dead
driver can leave gets a true final status (``plan_run``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aioproj.journal._records import RunState, encode, fold, parse_lines
from aioproj.journal._recover import plan_run

KEY = "a" * 32
NOW = 1_800_000_000_000


def _state(*records: dict[str, Any]) -> RunState:
    lines = b"".join(encode({"k": KEY, **r}) for r in records)
    _, runs = fold(parse_lines(lines))
    return runs[KEY]


INTENT = {"op": "intent", "uri": "file:///m", "backend": "local", "exp": "0", "t": 1}


def test_records_fold_in_order() -> None:
    run = _state(
        INTENT,
        {"op": "tracked", "run": "r1"},
        {"op": "started", "state": {"pgid": 42}},
        {"op": "exit", "rc": 3, "t": "1800000000.5"},
        {"op": "ended", "status": "FAILED", "end": 7},
    )
    assert (run.run_id, run.started, run.state, run.status, run.end_ms) == (
        "r1", True, {"pgid": 42}, "FAILED", 7,
    )  # fmt: skip
    assert (run.exit_code, run.exit_ms, run.done) == (3, 1_800_000_000_500, False)
    assert _state(INTENT, {"op": "done"}).done
    assert _state(INTENT, {"op": "void"}).done


def test_a_locale_decimal_comma_in_the_shells_time_is_read() -> None:
    run = _state(INTENT, {"op": "exit", "rc": 0, "t": "1800000000,25"})
    assert run.exit_ms == 1_800_000_000_250


def test_records_without_an_intent_describe_no_run() -> None:
    lines = encode({"op": "exit", "k": KEY, "rc": 0, "t": "1"})
    assert fold(parse_lines(lines))[1] == {}


@pytest.mark.parametrize(
    ("records", "alive", "status", "end"),
    [
        # intent only: the driver died before the tracking run (or found by its key)
        ([INTENT], False, "FAILED", NOW),
        # tracked, not started
        ([INTENT, {"op": "tracked", "run": "r"}], False, "FAILED", NOW),
        # started, processes still running: stopped, KILLED
        ([INTENT, {"op": "tracked", "run": "r"}, {"op": "started"}], True, "KILLED", NOW),
        # started, ended on its own: its exit code and end time
        ([INTENT, {"op": "started"}, {"op": "exit", "rc": 0, "t": "5"}], False, "FINISHED", 5000),
        ([INTENT, {"op": "started"}, {"op": "exit", "rc": 2, "t": "5"}], False, "FAILED", 5000),
        # started, gone without an exit code on record
        ([INTENT, {"op": "started"}], False, "FAILED", NOW),
        # ended, status not written: replayed with its end time
        ([INTENT, {"op": "started"}, {"op": "ended", "status": "KILLED", "end": 9}], False,
         "KILLED", 9),
        ([INTENT, {"op": "ended", "status": "FINISHED", "end": 9}, {"op": "kept"}], True,
         "FINISHED", 9),
        # a sweep's parent: cut short
        ([{**INTENT, "kind": "sweep"}, {"op": "tracked", "run": "p"}], False, "KILLED", NOW),
    ],
)  # fmt: skip
def test_every_state_gets_a_true_status(
    records: list[dict[str, Any]], alive: bool, status: str, end: int
) -> None:
    plan = plan_run(_state(*records), processes_alive=alive, now_ms=NOW)
    assert (plan.status, plan.end_ms) == (status, end)
    assert plan.reason


@given(
    st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {"op": st.sampled_from(["tracked", "started", "exit", "ended", "kept"])},
                optional={
                    "run": st.text(max_size=5),
                    "rc": st.integers(-300, 300),
                    "status": st.sampled_from(["FINISHED", "FAILED", "KILLED"]),
                    "t": st.one_of(st.integers(), st.text(max_size=8)),
                    "end": st.one_of(st.none(), st.integers(0, 2**40)),
                    "state": st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                },
            ),
            st.just({"op": "done"}),
        ),
        max_size=8,
    ),
    st.booleans(),
)
def test_a_plan_is_total_and_never_finished_without_exit_zero(
    records: list[dict[str, Any]], alive: bool
) -> None:
    run = _state(INTENT, *records)
    plan = plan_run(run, processes_alive=alive, now_ms=NOW)
    assert plan.status in ("FINISHED", "FAILED", "KILLED")
    if plan.status == "FINISHED":
        # Only the driver's own record of a FINISHED end, or an exit code of 0.
        assert run.status == "FINISHED" or (run.exit_code == 0 and not alive)


def test_garbage_lines_are_skipped() -> None:
    data = b"\x00\xff{\n" + json.dumps([1]).encode() + b"\n" + encode({**INTENT, "k": KEY})
    _, runs = fold(parse_lines(data))
    assert list(runs) == [KEY]
