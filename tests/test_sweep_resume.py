"""Resuming a sweep: the FINISHED trials are kept, the others run again under the same
parent run; a resume that does not fit the recorded sweep is refused before anything is
written; and after a SIGKILL of the driver and ``aioproj recover``, ``--resume``
completes the sweep."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import optuna
import pytest

import aioproj
from aioproj.sweeps import sample_space

from .support import all_runs, amake_project, make_project, mlflow_client, pids_in, process_gone

pytestmark = pytest.mark.anyio

# Trial x fails while gate/fail-x exists and holds while gate/hold-x exists; it logs
# loss = (x - 1.5)^2 into its run (the file store's format) and ends.
TRIAL_PY = """\
import os, sys, time, urllib.parse

x, gate = int(sys.argv[1]), sys.argv[2]
with open(os.path.join(gate, "pids"), "a") as f:
    f.write(f"{os.getpid()}\\n")
if os.path.exists(os.path.join(gate, f"fail-{x}")):
    print(f"trial {x}: the gate says fail", flush=True)
    sys.exit(3)
while os.path.exists(os.path.join(gate, f"hold-{x}")):
    time.sleep(0.05)
root = urllib.parse.urlparse(os.environ["MLFLOW_TRACKING_URI"]).path
folder = os.path.join(root, os.environ["MLFLOW_EXPERIMENT_ID"], os.environ["MLFLOW_RUN_ID"])
with open(os.path.join(folder, "metrics", "loss"), "a") as f:
    f.write(f"{int(time.time() * 1000)} {(x - 1.5) ** 2} 0\\n")
"""

MLPROJECT = """
entry_points:
  main:
    parameters:
      x: int
      gate: string
    command: "python trial.py {x} {gate}"
"""


@pytest.fixture
async def project(tmp_path: Path) -> Path:
    return await amake_project(tmp_path / "proj", MLPROJECT, {"trial.py": TRIAL_PY})


@pytest.fixture
async def gate(tmp_path: Path) -> anyio.Path:
    path = anyio.Path(tmp_path / "gate")
    await path.mkdir()
    return path


async def _wait(predicate: Any, limit: float = 30.0) -> None:
    with anyio.fail_after(limit):
        while not await predicate():  # noqa: ASYNC110 (a file written by another process)
            await anyio.sleep(0.05)


def _children(runs: list[Any], parent: str) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for run in runs:
        if run.data.tags.get("mlflow.parentRunId") == parent:
            out.setdefault(int(run.data.tags["aioproj.sweep.trial"]), []).append(run)
    return out


async def _interrupted_sweep(project: Path, gate: anyio.Path, **kwargs: Any) -> aioproj.Sweep:
    """Trial 0 finishes, trial 1 fails, trials 2 and 3 hold until the sweep is stopped."""
    await (gate / "fail-1").touch()
    await (gate / "hold-2").touch()
    await (gate / "hold-3").touch()
    sweep = aioproj.sweep(
        str(project),
        kwargs.pop("grid", {"x": [0, 1, 2, 3], "gate": str(gate)}),
        max_parallel=4,
        metric="loss",
        env_manager="local",
        **kwargs,
    )
    async with sweep:
        seen = set()
        async for result in sweep:
            seen.add(result.index)
            if seen >= {0, 1}:
                break
    assert sweep.status is aioproj.RunStatus.KILLED
    for name in ("fail-1", "hold-2", "hold-3"):
        await (gate / name).unlink()
    return sweep


async def test_resume_keeps_finished_trials_and_reruns_the_others(
    project: Path, gate: anyio.Path, tracking_uri: str
) -> None:
    first = await _interrupted_sweep(project, gate)
    parent = first.parent_run_id
    assert parent is not None
    before = {r.index: r for r in first.results}
    assert before[0].ok
    assert before[1].status is aioproj.RunStatus.FAILED
    assert "the gate says fail" in (before[1].reason or "")

    resumed = aioproj.sweep(
        str(project),
        {"x": [0, 1, 2, 3], "gate": str(gate)},
        max_parallel=4,
        metric="loss",
        resume=parent,
        env_manager="local",
    )
    results = [r async for r in resumed]
    assert resumed.parent_run_id == parent
    assert resumed.status is aioproj.RunStatus.FINISHED
    assert [r.index for r in results][:1] == [0]  # the kept trial comes first
    by_index = {r.index: r for r in results}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert all(r.ok for r in results)
    assert by_index[0].resumed
    assert by_index[0].run_id == before[0].run_id
    assert by_index[0].metrics == {"loss": 2.25}
    assert not any(by_index[i].resumed for i in (1, 2, 3))
    assert by_index[1].attempts == 2  # its first attempt was in the first session
    assert resumed.best is by_index[1] or resumed.best is by_index[2]

    runs = await all_runs(tracking_uri)
    records = {r.info.run_id: r for r in runs}
    assert records[parent].info.status == "FINISHED"
    assert records[parent].data.tags["aioproj.sweep.resumed"] == "1"
    assert records[parent].data.tags["aioproj.sweep.finished"] == "4"
    assert records[parent].data.tags["aioproj.sweep.killed"] == "0"
    children = _children(runs, parent)
    assert {i: len(rs) for i, rs in children.items()} == {0: 1, 1: 2, 2: 2, 3: 2}
    assert sorted(r.info.status for r in children[1]) == ["FAILED", "FINISHED"]
    for index in (2, 3):  # stopped with the first session
        assert sorted(r.info.status for r in children[index]) == ["FINISHED", "KILLED"]


async def test_a_tuner_hears_the_kept_trials_before_it_asks(
    project: Path, gate: anyio.Path, tracking_uri: str
) -> None:
    class Recorder:
        def __init__(self, budget: int) -> None:
            self.budget = budget
            self.events: list[tuple[str, int, bool]] = []

        def ask(self, index: int) -> Mapping[str, Any] | None:
            self.events.append(("ask", index, False))
            return {"x": index, "gate": str(gate)}

        def tell(self, result: aioproj.TrialResult) -> None:
            self.events.append(("tell", result.index, result.resumed))

    first_tuner = Recorder(4)
    first = await _interrupted_sweep(project, gate, grid=None, tuner=first_tuner, samples=4)
    tuner = Recorder(4)
    results = await aioproj.sweep(
        str(project),
        tuner=tuner,
        samples=4,
        max_parallel=2,
        resume=first.parent_run_id,
        env_manager="local",
    )
    assert tuner.events[0] == ("tell", 0, True)  # told before the first ask
    asks = [index for kind, index, _ in tuner.events if kind == "ask"]
    assert asks == [1, 2, 3]  # every index but the kept one, in order
    assert sorted(r.index for r in results) == [0, 1, 2, 3]
    assert all(r.ok for r in results)


async def test_a_random_sweep_resumes_with_its_recorded_seed(
    project: Path, gate: anyio.Path, tracking_uri: str
) -> None:
    # Every trial fails the first time (whatever x it drew); resumed without a seed, the
    # sweep draws the same parameter sets again from the seed it recorded.
    for x in range(4):
        await (gate / f"fail-{x}").touch()
    space = {"x": aioproj.Choice([0, 1, 2, 3]), "gate": str(gate)}
    first = aioproj.sweep(str(project), space, samples=6, env_manager="local")
    before = await first
    assert {r.status for r in before} == {aioproj.RunStatus.FAILED}
    for x in range(4):
        await (gate / f"fail-{x}").unlink()
    again = aioproj.sweep(
        str(project), space, samples=6, resume=first.parent_run_id, env_manager="local"
    )
    after = await again
    assert {r.index: r.params for r in after} == {r.index: r.params for r in before}
    assert all(r.ok for r in after)
    assert not any(r.resumed for r in after)  # nothing had finished: all ran again
    # Given another seed, the same sweep is refused: its parameter sets differ.
    drawn = [r.params for r in sorted(before, key=lambda r: r.index)]
    seed = next(s for s in range(1, 100) if sample_space(space, 6, seed=s) != drawn)
    other = aioproj.sweep(
        str(project), space, samples=6, seed=seed, resume=first.parent_run_id,
        env_manager="local",
    )  # fmt: skip
    with pytest.raises(aioproj.InvalidArgumentError, match="parameter sets differ"):
        await other


async def test_optuna_study_in_sqlite_resumes_too(
    project: Path, gate: anyio.Path, tmp_path: Path, tracking_uri: str
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def study() -> optuna.Study:
        loaded = optuna.create_study(study_name="resume", storage=storage, load_if_exists=True)
        if not loaded.trials:  # trial i proposes x=i
            for x in range(4):
                loaded.enqueue_trial({"x": x})
        return loaded

    space = {"x": [0, 1, 2, 3], "gate": str(gate)}
    created = await anyio.to_thread.run_sync(study)
    tuner = await anyio.to_thread.run_sync(aioproj.OptunaTuner, created, space, "loss")
    for x in range(4):
        await (gate / f"hold-{x}").touch()
    await (gate / "hold-0").unlink()
    first = aioproj.sweep(str(project), tuner=tuner, samples=4, max_parallel=2, env_manager="local")
    async with first:
        async for result in first:
            assert result.ok
            break  # trial 0 (x=0) ended; trial 1 still holds, and is stopped
    for x in range(1, 4):
        await (gate / f"hold-{x}").unlink()
    # A new process would load the study from its storage: so do we.
    loaded = await anyio.to_thread.run_sync(study)
    states = sorted(t.state.name for t in await anyio.to_thread.run_sync(lambda: loaded.trials))
    # the stopped trial was never told; two proposals wait in the queue
    assert states == ["COMPLETE", "RUNNING", "WAITING", "WAITING"]
    # (the tuner reads the study's directions: off the event loop for a database)
    tuner = await anyio.to_thread.run_sync(aioproj.OptunaTuner, loaded, space, "loss")
    results = await aioproj.sweep(
        str(project),
        tuner=tuner,
        samples=4,
        max_parallel=2,
        resume=first.parent_run_id,
        env_manager="local",
    )
    assert sorted(r.index for r in results) == [0, 1, 2, 3]
    final = await anyio.to_thread.run_sync(lambda: study().trials)
    by_state: dict[str, int] = {}
    for trial in final:
        by_state[trial.state.name] = by_state.get(trial.state.name, 0) + 1
    # The kept trial was not added twice; the abandoned one was marked FAIL.
    assert by_state == {"COMPLETE": 4, "FAIL": 1}
    run_ids = [t.user_attrs.get("aioproj.run_id") for t in final if t.state.name == "COMPLETE"]
    assert sorted(run_ids) == sorted(r.run_id for r in results)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grid": {"x": [0, 1, 2, 5]}}, "parameter sets differ"),
        ({"entry_point": "other"}, "entry point"),
        ({"tuner": "yes"}, "was not run with a tuner"),
    ],
)
async def test_a_resume_that_does_not_fit_is_refused_before_anything_changes(
    project: Path, gate: anyio.Path, tracking_uri: str, change: dict[str, Any], message: str
) -> None:
    first = await _interrupted_sweep(project, gate)
    before = sorted((r.info.run_id, r.info.status) for r in await all_runs(tracking_uri))
    kwargs: dict[str, Any] = {"grid": {"x": [0, 1, 2, 3], "gate": str(gate)}}
    kwargs.update(change)
    if kwargs.get("tuner") == "yes":
        kwargs["grid"] = None
        kwargs["tuner"] = type("T", (), {"ask": lambda s, i: None, "tell": lambda s, r: None})()
    sweep = aioproj.sweep(str(project), resume=first.parent_run_id, env_manager="local", **kwargs)
    with pytest.raises(aioproj.InvalidArgumentError, match=message):
        await sweep
    after = sorted((r.info.run_id, r.info.status) for r in await all_runs(tracking_uri))
    assert after == before  # no run created, the parent still KILLED


async def test_resume_of_what_is_no_sweep_or_still_runs(
    project: Path, gate: anyio.Path, tracking_uri: str
) -> None:
    with pytest.raises(aioproj.InvalidArgumentError, match="Invalid run id"):
        aioproj.sweep(str(project), {"x": [0]}, resume="../etc")
    await (gate / "hold-0").touch()
    running = aioproj.sweep(
        str(project), {"x": [0], "gate": str(gate)}, env_manager="local", metric="loss"
    )
    async with running:
        await _wait(lambda: (gate / "pids").exists())
        child = running.trials[0].run_id
        assert child is not None
        attempt = aioproj.sweep(
            str(project), {"x": [0], "gate": str(gate)}, resume=running.parent_run_id,
            env_manager="local",
        )  # fmt: skip
        with pytest.raises(aioproj.InvalidArgumentError, match="aioproj recover"):
            await attempt
        not_a_sweep = aioproj.sweep(
            str(project), {"x": [0], "gate": str(gate)}, resume=child, env_manager="local"
        )
        with pytest.raises(aioproj.InvalidArgumentError, match="not the parent run of"):
            await not_a_sweep
        await (gate / "hold-0").unlink()


def _cli(*args: str, cwd: Path, **kwargs: Any) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": (cwd / "mlruns").as_uri(),
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "aioproj", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _read_until(proc: subprocess.Popen[str], pattern: str, limit: float = 60) -> str:
    """Lines of ``proc`` until one matches ``pattern`` (the driver prints as it goes)."""
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + limit
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, "".join(seen)):
            return "".join(seen)
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError("".join(seen))


@pytest.mark.allow_blocking
def test_resume_after_sigkill_and_recover(tmp_path: Path) -> None:
    """The scenario of the README: the driver dies (SIGKILL), `aioproj recover` stops and
    records its trials, `aioproj sweep ... --resume` completes the sweep."""
    project = make_project(tmp_path / "proj", MLPROJECT, {"trial.py": TRIAL_PY})
    gate = tmp_path / "gate"
    gate.mkdir()
    for x in (1, 2, 3):
        (gate / f"hold-{x}").touch()
    command = [
        "sweep", str(project), "-P", "x=0,1,2,3", "-P", f"gate={gate}", "--max-parallel", "3",
        "--metric", "loss", "--env-manager", "local", "--progress", "lines",
    ]  # fmt: skip
    transcript = [f"$ aioproj {' '.join(command)}"]
    driver = _cli(*command, cwd=tmp_path, start_new_session=True)
    try:
        out = _read_until(driver, r"\[trial 0\] FINISHED(.|\n)*\[trial 3\] RUNNING")
        deadline = time.monotonic() + 30
        while not (gate / "pids").exists() or len(pids_in(gate / "pids")) < 4:
            assert time.monotonic() < deadline, "the trials never started"
            time.sleep(0.05)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        assert driver.stdout is not None
        driver.stdout.close()
    transcript += [out.rstrip(), "$ kill -KILL <driver>"]
    parent = re.search(r"parent run ([0-9a-f]{32})", out)
    assert parent is not None, out
    held = pids_in(gate / "pids")
    assert len(held) == 4
    assert not all(process_gone(pid) for pid in held)  # trials outlived their driver

    recovered = subprocess.run(
        [sys.executable, "-m", "aioproj", "recover", "--grace-period", "1"],
        cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert recovered.returncode == 0, recovered.stderr
    transcript += ["$ aioproj recover --grace-period 1", recovered.stdout.rstrip()]
    # the three trials it ran, and the sweep's parent run
    assert recovered.stdout.count("KILLED") == 4
    assert f"{parent.group(1)}  sweep" in recovered.stdout
    assert "sweep cut short" in recovered.stdout
    assert all(process_gone(pid) for pid in held)

    for x in (1, 2, 3):
        (gate / f"hold-{x}").unlink()
    resume = [*command, "--resume", parent.group(1)]
    resumed = _cli(*resume, cwd=tmp_path)
    out, _ = resumed.communicate(timeout=90)
    transcript += [f"$ aioproj {' '.join(resume)}", out.rstrip()]
    print("\n".join(transcript))  # the run of the report (pytest -s shows it)
    assert resumed.returncode == 0, out
    assert "kept from before the resume" in out
    assert "Sweep FINISHED" in out

    client = mlflow_client((tmp_path / "mlruns").as_uri())
    runs = client.search_runs(["0"])
    records = {r.info.run_id: r for r in runs}
    assert records[parent.group(1)].info.status == "FINISHED"
    children = _children(runs, parent.group(1))
    assert {i: sorted(r.info.status for r in rs) for i, rs in children.items()} == {
        0: ["FINISHED"],
        1: ["FINISHED", "KILLED"],
        2: ["FINISHED", "KILLED"],
        3: ["FINISHED", "KILLED"],
    }
    assert len(records) == 1 + 7  # one parent: the resume made no other
