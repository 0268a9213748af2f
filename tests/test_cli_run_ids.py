"""Run ids as a user types them: the short ids ``aioproj runs`` prints work wherever a run
id is taken (``logs``, ``report``, ``sweep --resume``, ``run --run-id``), an ambiguous one
lists its candidates, and ``aioproj logs`` on a sweep's parent run lists its trials."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from aioproj._browse import RunRow, resolve_run_id, short_ids
from aioproj.errors import TrackingError
from aioproj.tracking import FileStore

from .support import make_project
from .test_cli_sweep import aioproj_cli

MLPROJECT = """
entry_points:
  say:
    parameters:
      x: float
    command: "echo training with x={x}"
"""

# Two runs share their first 8 digits; short ids need 9 to tell them apart.
TWIN_A = "abcd1234" + "0" * 24
TWIN_B = "abcd1234" + "1" * 24
OTHER = "ffff0000" + "2" * 24


def _store_with_twins(tmp_path: Path) -> None:
    async def make() -> None:
        store = FileStore(tmp_path / "mlruns")
        alpha = await store.resolve_experiment(experiment_name="alpha", experiment_id=None)
        beta = await store.resolve_experiment(experiment_name="beta", experiment_id=None)
        for key, experiment in ((TWIN_A, alpha), (TWIN_B, alpha), (OTHER, beta)):
            await store.create_run(
                experiment, run_name=f"run-{key[:4]}", tags={}, params={}, client_key=key
            )
        await store.aclose()

    anyio.run(make)


def test_short_ids_are_the_shortest_unique_prefixes_of_at_least_8() -> None:
    assert short_ids([TWIN_A, TWIN_B, OTHER]) == {
        TWIN_A: TWIN_A[:9],
        TWIN_B: TWIN_B[:9],
        OTHER: OTHER[:8],
    }
    long_twins = ["0123456789a" + "0" * 21, "0123456789b" + "0" * 21]
    assert set(short_ids(long_twins).values()) == {"0123456789a", "0123456789b"}
    assert short_ids(["abc"]) == {"abc": "abc"}  # shorter than 8: the id itself


def test_a_short_id_resolves_and_an_ambiguous_one_lists_the_candidates() -> None:
    rows = [
        RunRow(key, "name", "1", "FINISHED", 1, 2, None, None, "alpha")
        for key in (TWIN_A, TWIN_B, OTHER)
    ]
    assert resolve_run_id(TWIN_A[:9], rows, "here") == TWIN_A
    assert resolve_run_id(OTHER[:3], rows, "here") == OTHER
    with pytest.raises(TrackingError, match="ambiguous") as caught:
        resolve_run_id("abcd", rows, "here")
    assert TWIN_A in str(caught.value)
    assert TWIN_B in str(caught.value)
    assert OTHER not in str(caught.value)
    with pytest.raises(TrackingError, match="Run 'zz' not found in here"):
        resolve_run_id("zz", rows, "here")


def test_runs_prints_short_ids_and_experiment_names(tmp_path: Path) -> None:
    _store_with_twins(tmp_path)
    table = aioproj_cli("runs", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:6] == ["RUN", "ID", "STATUS", "STARTED", "TIME", "EXPERIMENT"]
    first_column = {line.split()[0] for line in lines}
    assert first_column == {TWIN_A[:9], TWIN_B[:9], OTHER[:8]}
    assert sorted(line.split()[5] for line in lines) == ["alpha", "alpha", "beta"]
    # filtered to one experiment, the short ids stay unique across the whole store
    only_beta = aioproj_cli("runs", "--experiment-name", "alpha", "--json", cwd=tmp_path)
    rows = json.loads(only_beta.stdout)
    assert {(r["short_id"], r["experiment_name"]) for r in rows} == {
        (TWIN_A[:9], "alpha"),
        (TWIN_B[:9], "alpha"),
    }


def test_logs_of_an_ambiguous_short_id_lists_the_candidates(tmp_path: Path) -> None:
    _store_with_twins(tmp_path)
    done = aioproj_cli("logs", "abcd1234", cwd=tmp_path)
    assert done.returncode == 1
    assert "The run id 'abcd1234' is ambiguous: 2 runs" in done.stderr
    assert TWIN_A in done.stderr
    assert TWIN_B in done.stderr
    assert "Give more characters of the id." in done.stderr
    assert done.stdout == ""
    # one more digit picks one run (which saved no output: it was not started by aioproj)
    one = aioproj_cli("logs", TWIN_B[:9], cwd=tmp_path)
    assert one.returncode == 1
    assert f"Run '{TWIN_B}' has no saved output" in one.stderr
    missing = aioproj_cli("logs", "0123abcd", cwd=tmp_path)
    assert "Run '0123abcd' not found" in missing.stderr


def test_run_id_of_aioproj_run_takes_a_short_id_and_refuses_an_ambiguous_one(
    tmp_path: Path,
) -> None:
    _store_with_twins(tmp_path)
    project = make_project(tmp_path / "proj", MLPROJECT)
    done = aioproj_cli(
        "run", str(project), "-e", "say", "-P", "x=1", "--run-id", "abcd", cwd=tmp_path
    )
    assert done.returncode != 0
    assert "ambiguous" in done.stderr
    runs = json.loads(aioproj_cli("runs", "--json", cwd=tmp_path).stdout)
    assert len(runs) == 3  # no run was created


def test_short_ids_in_logs_report_and_resume_and_logs_of_a_sweep_parent(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", MLPROJECT)
    swept = aioproj_cli(
        "sweep", str(project), "-e", "say", "-P", "x=1,2", "--run-name", "grid",
        "--env-manager", "local", "--experiment-name", "ids", cwd=tmp_path,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    rows = json.loads(aioproj_cli("runs", "--json", cwd=tmp_path).stdout)
    parent = next(r for r in rows if r["run_name"] == "grid")
    trials = [r for r in rows if r["parent_run_id"] == parent["run_id"]]
    assert len(trials) == 2
    assert all(len(r["short_id"]) < len(r["run_id"]) for r in rows)

    trial = trials[0]
    logs = aioproj_cli("logs", trial["short_id"], cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.startswith("training with x=")

    of_parent = aioproj_cli("logs", parent["short_id"], cwd=tmp_path)
    assert of_parent.returncode == 1
    assert f"Run '{parent['run_id']}' is the parent run of a sweep" in of_parent.stderr
    assert "Its 2 trials" in of_parent.stderr
    for row in trials:
        assert f"{row['short_id']}  FINISHED" in of_parent.stderr
    assert "not started by aioproj" not in of_parent.stderr

    report = aioproj_cli("report", parent["short_id"], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / f"sweep-{parent['run_id'][:8]}.html").is_file()

    resumed = aioproj_cli(
        "sweep", str(project), "-e", "say", "-P", "x=1,2", "--env-manager", "local",
        "--experiment-name", "ids", "--resume", parent["short_id"], cwd=tmp_path,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    after = json.loads(aioproj_cli("runs", "--json", cwd=tmp_path).stdout)
    assert len(after) == len(rows)  # both trials kept: nothing to run again
