"""Load: runs near the open-files limit queue instead of failing, a child flooding its
output does not grow the driver's memory, and many runs with random cancels leave no
process and no RUNNING record behind."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import anyio
import pytest

from aioproj import Runner, RunStatus

from .support import all_runs, amake_project, survivors

pytestmark = pytest.mark.anyio

DRIVER = """\
import asyncio, json, resource, sys
import aioproj

async def main():
    project, n, params = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    async with aioproj.Runner(echo="off") as runner:
        results = await asyncio.gather(
            *[runner.run(project, parameters=params, env_manager="local") for _ in range(n)],
            return_exceptions=True,
        )
    print(json.dumps({
        "ok": sum(1 for r in results if not isinstance(r, BaseException)),
        "errors": [repr(r)[:300] for r in results if isinstance(r, BaseException)],
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))

asyncio.run(main())
"""


async def _drive(
    tmp_path: Path, mlproject: str, n: int, params: dict[str, str], *, ulimit: int | None = None
) -> dict[str, object]:
    project = await amake_project(tmp_path / "proj", mlproject)
    driver = tmp_path / "driver.py"
    await anyio.Path(driver).write_text(DRIVER)
    command = f"exec {sys.executable} {driver} {project} {n} '{json.dumps(params)}'"
    if ulimit is not None:
        command = f"ulimit -n {ulimit}; {command}"
    result = await anyio.run_process(["bash", "-c", command], check=False)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    out: dict[str, object] = json.loads(result.stdout.decode().strip().splitlines()[-1])
    return out


SLEEP = """\
name: sleep
entry_points:
  main:
    parameters:
      seconds: float
    command: "sleep {seconds}"
"""


async def test_runs_beyond_the_open_files_limit_queue_instead_of_failing(
    tmp_path: Path, tracking_uri: str
) -> None:
    # 64 descriptors leave room for about ten live runs: 60 must queue, not fail.
    out = await _drive(tmp_path, SLEEP, 60, {"seconds": "0.3"}, ulimit=64)
    assert out["errors"] == []
    assert out["ok"] == 60
    runs = await all_runs(tracking_uri)
    assert [r.info.status for r in runs] == ["FINISHED"] * 60


FLOOD = """\
name: flood
entry_points:
  main:
    parameters:
      mib: int
    command: "head -c {mib}M /dev/zero | tr '\\\\0' 'x' | fold -w 1000"
"""


@pytest.mark.slow
async def test_a_child_flooding_its_output_does_not_grow_the_driver(
    tmp_path: Path, tracking_uri: str
) -> None:
    small = await _drive(tmp_path / "small", FLOOD, 1, {"mib": "1"})
    big = await _drive(tmp_path / "big", FLOOD, 1, {"mib": "1024"})
    assert small["ok"] == big["ok"] == 1
    growth_mb = (int(big["max_rss_kb"]) - int(small["max_rss_kb"])) / 1024  # type: ignore[call-overload]
    # The run log keeps its first and last 8 MB; a GB went through the pipe.
    assert growth_mb < 60, f"driver grew {growth_mb:.0f} MB while a child wrote 1 GB"
    runs = await all_runs(tracking_uri)
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
async def test_many_runs_with_random_cancels_leave_nothing_behind(
    tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(
        tmp_path / "proj",
        """\
        name: p
        entry_points:
          main:
            parameters:
              pids: string
              seconds: float
            command: "echo $$ >> {pids}; sleep {seconds}"
        """,
    )
    pids = tmp_path / "pids"
    rng = random.Random(7)
    n = 200
    async with Runner(max_concurrency=50, echo="off", grace_period=1) as runner:

        async def one(i: int) -> None:
            # Every 7th run is long and gets cancelled, queued or running.
            seconds = 30.0 if i % 7 == 0 else rng.choice([0, 0.05, 0.2])
            with anyio.move_on_after(rng.uniform(0.1, 4.0) if i % 7 == 0 else 60):
                await runner.run(
                    str(project), parameters={"pids": str(pids), "seconds": seconds},
                    env_manager="local",
                )  # fmt: skip

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
    assert await survivors(pids) == []
    runs = await all_runs(tracking_uri)
    statuses = [r.info.status for r in runs]
    assert "RUNNING" not in statuses
    assert statuses.count("FINISHED") + statuses.count("KILLED") == len(statuses)
    assert statuses.count("KILLED") >= 1
    assert len(statuses) <= n
    assert RunStatus.KILLED.value == "KILLED"
