"""aioproj.sweep with real processes: order, limits, fail-fast, retries, cancellation,
parent and child records read back with MLflow's client."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproj
from aioproj.backends.base import Launch, LaunchRequest
from aioproj.backends.local import LocalBackend
from aioproj.sweeps import expand_grid, sample_space

from .support import all_runs, amake_project, pids_in, survivors, wait_for_file

pytestmark = pytest.mark.anyio

# Every trial appends "start <ns>" / "end <ns>" lines to a shared log: the overlap of
# those intervals is the number of trials that ran at once.
MLPROJECT = """
entry_points:
  main:
    parameters:
      name: {type: string, default: x}
      sleep: {type: float, default: 0.2}
      code: {type: int, default: 0}
      log: {type: string, default: /dev/null}
    command: >-
      echo "start $(date +%s%N)" >> {log};
      sleep {sleep};
      echo "end $(date +%s%N)" >> {log};
      exit {code}
  wait_for:
    parameters:
      file: string
      mark: string
    command: >-
      echo $$ >> {mark};
      while [ ! -e {file} ]; do sleep 0.02; done
  touch:
    parameters:
      file: string
    command: "touch {file}"
  long:
    parameters:
      pids: string
      code: {type: int, default: 0}
      wait_lines: {type: int, default: 0}
    command: >-
      echo $$ >> {pids};
      if [ {code} != 0 ]; then
        while [ $(wc -l < {pids}) -lt {wait_lines} ]; do sleep 0.02; done; exit {code};
      fi;
      sleep 60
"""


@pytest.fixture
async def project(tmp_path: Path) -> Path:
    return await amake_project(tmp_path / "proj", MLPROJECT)


def _max_overlap(log: Path) -> int:
    events = []
    for line in log.read_text().split("\n"):
        if line:
            kind, stamp = line.split()
            events.append((int(stamp), 0 if kind == "end" else 1))
    running = peak = 0
    for _, delta in sorted(events):
        running += 1 if delta else -1
        peak = max(peak, running)
    return peak


async def test_completion_order_within_one_sweep(
    project: Path, tmp_path: Path, tracking_uri: str
) -> None:
    # Trial 2 waits for file a, trial 0 for b, trial 1 for c; the test makes a, then b
    # when trial 2's result arrives, then c: completion order 2, 0, 1 whatever the timing.
    a, b, c, marks = (tmp_path / name for name in ("a", "b", "c", "marks"))
    sweep = aioproj.sweep(
        str(project),
        [
            {"file": str(b), "mark": str(marks)},
            {"file": str(c), "mark": str(marks)},
            {"file": str(a), "mark": str(marks)},
        ],
        entry_point="wait_for",
        max_parallel=3,
        env_manager="local",
    )
    seen: list[int] = []
    async with sweep:
        await wait_for_file(marks, lines=3)
        await anyio.Path(a).touch()
        async for result in sweep:
            assert result.ok
            seen.append(result.index)
            await anyio.Path(b if result.index == 2 else c).touch()
    assert seen == [2, 0, 1]


async def test_max_parallel_is_never_exceeded(
    project: Path, tmp_path: Path, tracking_uri: str
) -> None:
    log = tmp_path / "intervals"
    results = await aioproj.sweep(
        str(project),
        {"name": [f"t{i}" for i in range(7)], "sleep": 0.3, "log": str(log)},
        max_parallel=3,
        env_manager="local",
    )
    assert sorted(r.index for r in results) == list(range(7))
    assert all(r.ok for r in results)
    peak = await anyio.to_thread.run_sync(_max_overlap, log)
    assert 1 < peak <= 3


async def test_keep_going_runs_every_trial_and_parent_finishes(
    project: Path, tracking_uri: str
) -> None:
    sweep = aioproj.sweep(
        str(project), {"code": [0, 3, 0, 0], "sleep": 0}, max_parallel=2, env_manager="local"
    )
    results = await sweep
    by_index = {r.index: r for r in results}
    assert [by_index[i].status for i in range(4)] == ["FINISHED", "FAILED", "FINISHED", "FINISHED"]
    failed = by_index[1]
    assert failed.error is None
    assert failed.attempts == 1
    assert sweep.status is aioproj.RunStatus.FINISHED


async def test_fail_fast_cancels_running_trials_and_skips_the_rest(
    project: Path, tmp_path: Path, tracking_uri: str
) -> None:
    pids = tmp_path / "pids"
    # Trial 1 fails once three trials are running; trials 0 and 2 run until cancelled.
    grid: list[Mapping[str, Any]] = [{"pids": str(pids)} for _ in range(6)]
    grid[1] = {"pids": str(pids), "code": 5, "wait_lines": 3}
    sweep = aioproj.sweep(
        str(project), grid, entry_point="long", max_parallel=3, fail_fast=True,
        env_manager="local",
    )  # fmt: skip
    with anyio.fail_after(30):
        results = await sweep
    statuses = sorted((r.index, r.status.value) for r in results)
    assert statuses == [(0, "KILLED"), (1, "FAILED"), (2, "KILLED")]
    assert [t.status for t in sweep.trials[3:]] == ["SKIPPED"] * 3
    assert await survivors(pids) == []
    assert sweep.status is aioproj.RunStatus.FAILED
    records = {r.info.run_id: r for r in await all_runs(tracking_uri)}
    assert records[sweep.parent_run_id].info.status == "FAILED"
    for result in results:
        assert records[result.run_id].info.status == result.status.value


class FlakyBackend:
    """The local backend, refusing the first ``failures`` launches of each trial."""

    name = "local"

    def __init__(self, failures: int) -> None:
        self._inner = LocalBackend()
        self._failures = failures
        self.refused: dict[str, int] = {}

    async def prepare(self, request: LaunchRequest) -> Launch:
        key = str(request.parameters.logged.get("name"))
        if self.refused.get(key, 0) < self._failures:
            self.refused[key] = self.refused.get(key, 0) + 1
            raise aioproj.BackendError(f"service unavailable for {key}")
        return await self._inner.prepare(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_infrastructure_failures_are_retried(project: Path, tracking_uri: str) -> None:
    backend = FlakyBackend(failures=2)
    results = await aioproj.sweep(
        str(project),
        {"name": ["a", "b"], "sleep": 0},
        backend=backend,
        retries=2,
        retry_delay=0.01,
        env_manager="local",
    )
    assert [(r.status.value, r.attempts) for r in results] == [("FINISHED", 3)] * 2
    assert backend.refused == {"a": 2, "b": 2}


async def test_retries_run_out(project: Path, tracking_uri: str) -> None:
    results = await aioproj.sweep(
        str(project),
        {"name": ["a"], "sleep": 0},
        backend=FlakyBackend(failures=5),
        retries=1,
        retry_delay=0.01,
        env_manager="local",
    )
    [result] = results
    assert result.status is aioproj.RunStatus.FAILED
    assert result.attempts == 2
    assert isinstance(result.error, aioproj.BackendError)
    assert result.run_id is None


async def test_project_failures_are_not_retried(project: Path, tracking_uri: str) -> None:
    [result] = await aioproj.sweep(
        str(project), [{"code": 2, "sleep": 0}], retries=3, retry_delay=0, env_manager="local"
    )
    assert result.status is aioproj.RunStatus.FAILED
    assert result.attempts == 1
    runs = await all_runs(tracking_uri)
    assert len(runs) == 2  # the parent and one child


async def test_cancelling_the_consumer_kills_every_trial(
    project: Path, tmp_path: Path, tracking_uri: str
) -> None:
    pids = tmp_path / "pids"
    sweep = aioproj.sweep(
        str(project),
        [{"pids": str(pids)} for _ in range(6)],
        entry_point="long",
        max_parallel=4,
        env_manager="local",
    )
    with anyio.move_on_after(30):
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                async for _ in sweep:
                    pass

            tg.start_soon(consume)
            await wait_for_file(pids, lines=4)
            tg.cancel_scope.cancel()
    assert len(await anyio.to_thread.run_sync(pids_in, pids)) == 4
    assert await survivors(pids) == []
    assert sweep.status is aioproj.RunStatus.KILLED
    assert [t.status for t in sweep.trials] == ["KILLED"] * 4 + ["QUEUED"] * 2
    records = await all_runs(tracking_uri)
    assert len(records) == 5  # parent + 4 trials; the queued 2 never started
    assert {r.info.status for r in records} == {"KILLED"}


async def test_break_stops_the_sweep(project: Path, tmp_path: Path, tracking_uri: str) -> None:
    pids = tmp_path / "pids"
    grid: list[Mapping[str, Any]] = [{"pids": str(pids)} for _ in range(3)]
    grid[0] = {"pids": str(pids), "code": 1, "wait_lines": 3}  # ends first
    sweep = aioproj.sweep(
        str(project), grid, entry_point="long", max_parallel=3, env_manager="local"
    )
    async for result in sweep:
        assert result.index == 0
        break
    # The loop's async-generator finaliser closes the sweep; poll for it (no event to wait
    # on: nothing but the break may stop the sweep here).
    with anyio.fail_after(20):
        while not sweep.status.is_terminal:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    assert sweep.status is aioproj.RunStatus.KILLED
    assert await survivors(pids) == []
    statuses = sorted(r.info.status for r in await all_runs(tracking_uri))
    assert statuses == ["FAILED", "KILLED", "KILLED", "KILLED"]


@pytest.mark.allow_blocking
async def test_parent_and_child_records(project: Path, tracking_uri: str) -> None:
    sweep = aioproj.sweep(
        str(project),
        {"name": ["a", "b"], "sleep": [0, 0.1]},
        experiment_name="sweeps",
        name="my-sweep",
        env_manager="local",
    )
    results = await sweep
    assert len(results) == 4
    records = {r.info.run_id: r for r in await all_runs(tracking_uri)}
    parent = records.pop(sweep.parent_run_id)
    assert parent.info.run_name == "my-sweep"
    assert parent.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.tags["aioproj.sweep.finished"] == "4"
    assert {r.run_id for r in results} == set(records)
    for result in results:
        child = records[result.run_id]
        assert child.data.tags["mlflow.parentRunId"] == sweep.parent_run_id
        assert child.data.tags["aioproj.sweep.trial"] == str(result.index)
        assert child.data.params["name"] == result.params["name"]
        assert child.info.experiment_id == parent.info.experiment_id
        assert child.info.status == "FINISHED"


class HalvingTuner:
    """Proposes ``x`` values; each new one depends on results told so far."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.told: list[aioproj.TrialResult] = []
        self.asked: list[int] = []

    async def ask(self, index: int) -> Mapping[str, Any] | None:
        if index >= self.budget:
            return None
        self.asked.append(index)
        return {"name": f"x{index}-after-{len(self.told)}", "sleep": 0}

    async def tell(self, result: aioproj.TrialResult) -> None:
        await anyio.sleep(0.05)  # a tuner that takes a while to learn: ask must wait
        self.told.append(result)


async def test_tuner_proposes_as_results_arrive(project: Path, tracking_uri: str) -> None:
    tuner = HalvingTuner(budget=5)
    results = await aioproj.sweep(str(project), tuner=tuner, max_parallel=2, env_manager="local")
    assert len(results) == 5
    assert all(r.ok for r in results)
    assert tuner.asked == [0, 1, 2, 3, 4]
    assert [r.index for r in tuner.told] == [r.index for r in results]
    # The first two were asked before any result; later ones after some results.
    names = [r.params["name"] for r in sorted(results, key=lambda r: r.index)]
    assert names[0].endswith("after-0")
    assert names[1].endswith("after-0")
    assert all(not name.endswith("after-0") for name in names[2:])


def test_grid_expansion() -> None:
    assert expand_grid({"a": [1, 2], "b": "x", "c": (True, False)}) == [
        {"a": 1, "b": "x", "c": True},
        {"a": 1, "b": "x", "c": False},
        {"a": 2, "b": "x", "c": True},
        {"a": 2, "b": "x", "c": False},
    ]


def test_samples_are_reproducible_and_in_range() -> None:
    space = {
        "lr": aioproj.LogUniform(1e-4, 1e-1),
        "drop": aioproj.Uniform(0, 0.5),
        "layers": aioproj.IntUniform(1, 4),
        "act": ["relu", "tanh"],
        "fixed": 7,
    }
    first = sample_space(space, 50, seed=3)
    assert first == sample_space(space, 50, seed=3)
    assert first != sample_space(space, 50, seed=4)
    for params in first:
        assert 1e-4 <= params["lr"] <= 1e-1
        assert 0 <= params["drop"] <= 0.5
        assert params["layers"] in {1, 2, 3, 4}
        assert params["act"] in {"relu", "tanh"}
        assert params["fixed"] == 7
    assert {p["layers"] for p in first} == {1, 2, 3, 4}
    assert min(math.log10(p["lr"]) for p in first) < -3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": {"a": []}}, "has no values"),
        ({"grid": {"a": aioproj.Uniform(0, 1)}}, "give samples=N"),
        ({"grid": []}, "is empty"),
        ({"grid": [1]}, "must hold mappings"),
        ({"grid": {"a": [1]}, "max_parallel": 0}, "max_parallel"),
        ({"grid": {"a": [1]}, "samples": 0}, "samples"),
        ({"grid": {"a": [1]}, "goal": "best"}, "goal"),
        ({}, "Give a grid"),
        ({"grid": {"a": [1]}, "tuner": HalvingTuner(1)}, "not both"),
    ],
)
def test_bad_sweep_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(aioproj.InvalidArgumentError, match=message):
        aioproj.sweep(".", **kwargs)


def test_bad_distributions() -> None:
    with pytest.raises(aioproj.InvalidArgumentError, match="0 < low"):
        aioproj.LogUniform(0, 1)
    with pytest.raises(aioproj.InvalidArgumentError, match="low <= high"):
        aioproj.Uniform(2, 1)
    with pytest.raises(aioproj.InvalidArgumentError, match="non-empty"):
        aioproj.Choice([])
