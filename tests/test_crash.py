"""Crash injection: a driver killed with SIGKILL at every step of a run's life, then
``aioproj recover``; the invariant must hold every time:

1. no live process started by the dead driver (run process groups, processes that left
   them, environment builds);
2. no RUNNING record created by it, sweep parents included;
3. every status true: FINISHED only for a run whose command exited 0, never for one
   that exited otherwise;
4. nothing left to recover afterwards.

Kill points: the fetch, the environment build, the tracking create in flight (its
answer held back by a proxy), a burst of 50 starts (killed once 1, 3, 10 and 25
processes exist), all runs running, runs that end after the kill, the final status write
in flight, a sweep's parent's final write. The remote backends' kill points are in
``test_crash_remote.py``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import pytest

from aioproj._marks import MARK_VARIABLE
from aioproj.journal import recover

from .faultproxy import FaultProxy
from .mlflow_server import MlflowServer
from .support import make_project, mlflow_client, process_gone, until

pytestmark = [pytest.mark.anyio, pytest.mark.allow_blocking]

MLPROJECT = """\
name: crash
entry_points:
  main:
    parameters:
      seconds: {type: float, default: 0}
      code: {type: int, default: 0}
      marks: string
    command: >-
      echo $MLFLOW_RUN_ID $$ >> {marks}/started;
      sleep {seconds};
      echo $MLFLOW_RUN_ID {code} >> {marks}/ended;
      exit {code}
"""

DRIVER = """\
import asyncio, json, sys
import aioproj

spec = json.loads(sys.argv[1])

async def main():
    async with aioproj.Runner(echo="off") as runner:
        runs = await asyncio.gather(*(
            runner.run(spec["uri"], parameters=p, env_manager=spec.get("env_manager", "local"),
                       synchronous=False)
            for p in spec["params"]
        ))
        print("started", flush=True)
        await asyncio.gather(*runs)

asyncio.run(main())
"""

#: Every run of a burst: a third end at once with 0, a third at once with 3, a third sleep.
BURST = 50


def burst_params(marks: Path, n: int = BURST) -> list[dict[str, Any]]:
    shapes = [(0, 0), (0, 3), (60, 0)]
    return [
        {"seconds": shapes[i % 3][0], "code": shapes[i % 3][1], "marks": str(marks)}
        for i in range(n)
    ]


class Scene:
    """One driver process and what it leaves behind."""

    def __init__(self, root: Path, tracking_uri: str) -> None:
        self.root = root
        self.tracking_uri = tracking_uri
        self.experiment = f"crash-{uuid.uuid4().hex[:8]}"
        self.marks = root / "marks"
        self.marks.mkdir(parents=True)
        self.project = make_project(root / "project", MLPROJECT)
        self.proc: anyio.abc.Process | None = None
        self.recovered: list[Any] = []

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_EXPERIMENT_NAME": self.experiment,
        }

    async def start_driver(self, spec: dict[str, Any], argv: list[str] | None = None) -> None:
        driver = self.root / "driver.py"
        await anyio.Path(driver).write_text(DRIVER)
        args = argv or [sys.executable, str(driver), json.dumps(spec)]
        self.proc = await anyio.open_process(args, env=self.env())

    async def kill_driver(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self.proc.aclose()

    def lines(self, name: str) -> list[list[str]]:
        path = self.marks / name
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    async def wait_started(self, count: int, limit: float = 60) -> None:
        await until(lambda: len(self.lines("started")) >= count, limit=limit, interval=0.005)

    def records(self) -> list[Any]:
        client = mlflow_client(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return []
        return list(client.search_runs([experiment.experiment_id], run_view_type=3))

    async def recover_and_check(self, *, expect_runs: int | None = None) -> list[Any]:
        """``aioproj recover``, then the invariant. Returns the records."""
        journals = await anyio.to_thread.run_sync(_journal_ids)
        self.recovered = await recover(grace_period=1)
        await anyio.to_thread.run_sync(self.check_invariant, journals, expect_runs)
        assert await recover() == [], "recover left something to do"
        return await anyio.to_thread.run_sync(self.records)

    def check_invariant(self, journals: set[str], expect_runs: int | None) -> None:
        # 1. No process of the dead driver (by its mark, and by the pids runs wrote).
        left = marked_processes(journals)
        assert left == [], [_describe(pid) for pid in left]
        for _run_id, pid in self.lines("started"):
            assert process_gone(int(pid)), f"process {pid} of a dead driver still runs"
        # 2. No record left RUNNING.
        records = self.records()
        if expect_runs is not None:
            assert len(records) == expect_runs
        running = [r.info.run_id for r in records if r.info.status not in _FINAL]
        assert running == [], f"runs left {running}; recover did {self.recovered}"
        # Nothing half-written left in a file store (a dead driver's draft of a run).
        if self.tracking_uri.startswith("file:"):
            root = Path(self.tracking_uri.removeprefix("file://"))
            drafts = [p.name for p in root.glob("*/.*.tmp")]
            assert drafts == [], f"half-written runs left: {drafts}"
        # 3. Every status true: FINISHED only for a command that exited 0, never for
        # one that exited otherwise (KILLED when recover stopped its shell first).
        exits = {run_id: int(code) for run_id, code in self.lines("ended")}
        for record in records:
            run_id, status = record.info.run_id, record.info.status
            if "aioproj.sweep.size" in record.data.tags:
                continue  # a sweep's parent runs no command
            if status == "FINISHED":
                assert exits.get(run_id) == 0, f"{run_id} FINISHED without exiting 0"
            if exits.get(run_id, 0) != 0:
                assert status in ("FAILED", "KILLED"), f"{run_id} exited non-zero: {status}"


_FINAL = ("FINISHED", "FAILED", "KILLED")


def _describe(pid: int) -> str:
    """A process, for an assertion message: its state, command line and mark."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError as exc:
        return f"{pid}: {exc}"
    mark = [e.decode() for e in environ if e.startswith(_PREFIX)]
    return f"{pid} state={stat[0]} ppid={stat[1]} pgid={stat[2]} {cmdline[-60:]!r} {mark}"


def _journal_ids() -> set[str]:
    """The journals of this test's drivers (their files' names)."""
    folder = Path(os.environ["AIOPROJ_CACHE_DIR"]) / "journal"
    return {p.stem for p in folder.glob("*.log")} if folder.is_dir() else set()


def marked_processes(journals: set[str]) -> list[int]:
    """Live processes marked by one of ``journals``, still there a moment later (one
    that is exiting on its own is not a leftover)."""

    def scan() -> set[int]:
        found = set()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                continue
            marks = [i[len(_PREFIX) :] for i in environ.split(b"\0") if i.startswith(_PREFIX)]
            ours = any(m.split(b"/")[0].decode() in journals for m in marks)
            if ours and not process_gone(int(name)):
                found.add(int(name))
        return found

    first = scan()
    if first:
        time.sleep(0.5)
        return sorted(first & scan())
    return []


_PREFIX = MARK_VARIABLE.encode() + b"="


@pytest.fixture
def server_proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(mlflow_server.uri) as proxy:
        yield proxy


async def _wait_event(event: threading.Event, limit: float = 60) -> None:
    await until(event.is_set, limit=limit, interval=0.005)


# -- the burst ------------------------------------------------------------------------------


@pytest.mark.parametrize("rep", [1, 2])
@pytest.mark.parametrize("started", [1, 3, 10, 25])
async def test_killed_during_a_burst_of_starts(
    tmp_path: Path, tracking_uri: str, started: int, rep: int
) -> None:
    """50 runs starting at once (file store); SIGKILL once ``started`` processes exist."""
    scene = Scene(tmp_path, tracking_uri)
    await scene.start_driver({"uri": str(scene.project), "params": burst_params(scene.marks)})
    await scene.wait_started(started)
    await scene.kill_driver()
    records = await scene.recover_and_check()
    assert len(records) >= started


async def test_killed_while_runs_run_and_some_end_after(tmp_path: Path, tracking_uri: str) -> None:
    """All started; some end on their own after the kill (their shell records the exit)."""
    scene = Scene(tmp_path, tracking_uri)
    params = [
        {"seconds": s, "code": c, "marks": str(scene.marks)}
        for s, c in [(60, 0), (60, 0), (0.6, 0), (0.6, 4), (0.6, 0)]
    ]
    await scene.start_driver({"uri": str(scene.project), "params": params})
    await scene.wait_started(5)
    await scene.kill_driver()
    await until(lambda: len(scene.lines("ended")) >= 3)
    await anyio.sleep(0.3)  # their shells write the exit record as they exit
    records = await scene.recover_and_check(expect_runs=5)
    statuses = sorted(r.info.status for r in records)
    assert statuses == ["FAILED", "FINISHED", "FINISHED", "KILLED", "KILLED"]


# -- tracking -------------------------------------------------------------------------------


@pytest.mark.parametrize("rep", [1, 2])
async def test_killed_while_the_tracking_create_is_in_flight(
    tmp_path: Path, server_proxy: FaultProxy, rep: int
) -> None:
    """The server created the run, its answer is held; the driver dies: no ghost stays."""
    scene = Scene(tmp_path, server_proxy.url)
    created = server_proxy.hold("POST", "/runs/create")
    params = [{"seconds": 60, "code": 0, "marks": str(scene.marks)}]
    await scene.start_driver({"uri": str(scene.project), "params": params})
    await _wait_event(created)
    await anyio.sleep(0.2)  # the server has committed it
    await scene.kill_driver()
    server_proxy.clear()
    (record,) = await scene.recover_and_check(expect_runs=1)
    assert record.info.status == "FAILED"
    assert "before the run could start" in record.data.tags["aioproj.recovered"]


@pytest.mark.parametrize("rep", [1, 2])
async def test_killed_while_the_final_status_is_being_written(
    tmp_path: Path, server_proxy: FaultProxy, rep: int
) -> None:
    """The run ended (exit 0), its final write is held, the driver dies: FINISHED anyway."""
    scene = Scene(tmp_path, server_proxy.url)
    writing = server_proxy.hold("POST", "/runs/update")
    params = [{"seconds": 0, "code": 0, "marks": str(scene.marks)}]
    await scene.start_driver({"uri": str(scene.project), "params": params})
    await _wait_event(writing)
    await scene.kill_driver()
    server_proxy.clear()
    (record,) = await scene.recover_and_check(expect_runs=1)
    assert record.info.status == "FINISHED"


async def test_killed_during_a_burst_on_a_tracking_server(
    tmp_path: Path, server_proxy: FaultProxy
) -> None:
    scene = Scene(tmp_path, server_proxy.url)
    await scene.start_driver({"uri": str(scene.project), "params": burst_params(scene.marks, 30)})
    await scene.wait_started(5)
    await scene.kill_driver()
    await scene.recover_and_check()


# -- before anything is tracked ---------------------------------------------------------------


STALLING_CONDA = """\
#!/bin/sh
# A stand-in for conda whose environment builds never end.
case "$1 $2" in
  "env list") echo '{"envs": []}' ;;
  "env create"|"create "*) touch "$TMPDIR/half-built"; echo "$TMPDIR" > "$MARKS/tmpdir"
    echo "$$" >> "$MARKS/build"; sleep 300 ;;
  *) echo "conda stand-in" ;;
esac
"""


async def test_killed_during_the_environment_build(tmp_path: Path, tracking_uri: str) -> None:
    """The build's process carries the driver's mark: recover stops it and removes its
    temporary directory; nothing tracked."""
    scene = Scene(tmp_path, tracking_uri)
    (scene.project / "conda.yaml").write_text("name: x\ndependencies: [python=3.11]\n")
    text = (scene.project / "MLproject").read_text()
    (scene.project / "MLproject").write_text(
        text.replace("name: crash\n", "name: crash\nconda_env: conda.yaml\n")
    )
    conda = tmp_path / "bin" / "conda"
    conda.parent.mkdir()
    conda.write_text(STALLING_CONDA)
    conda.chmod(0o755)
    os.environ["CONDA_EXE"] = str(conda)
    os.environ["MARKS"] = str(scene.marks)
    try:
        params = [{"seconds": 0, "code": 0, "marks": str(scene.marks)}]
        await scene.start_driver(
            {"uri": str(scene.project), "params": params, "env_manager": "conda"}
        )
        await until((scene.marks / "build").exists, limit=60)
        (build_pid,) = [int(p) for p in (scene.marks / "build").read_text().split()]
        await scene.kill_driver()
        assert not process_gone(build_pid)  # the build outlived its driver
        build_temp = Path((scene.marks / "tmpdir").read_text().strip())
        assert await anyio.Path(build_temp / "half-built").exists()
        records = await scene.recover_and_check(expect_runs=0)
        assert records == []
        assert process_gone(build_pid)
        assert not await anyio.Path(build_temp).exists()  # the build's TMPDIR went with it
    finally:
        del os.environ["CONDA_EXE"], os.environ["MARKS"]


async def test_killed_during_the_fetch(tmp_path: Path, tracking_uri: str) -> None:
    """A zip project whose download hangs: the driver dies in the fetch, nothing is left."""
    import http.server
    import shutil

    scene = Scene(tmp_path, tracking_uri)
    archive = shutil.make_archive(str(tmp_path / "crash"), "zip", scene.project)
    served = Path(archive).parent
    handler = type(
        "Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}
    )
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(served))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with FaultProxy(f"http://127.0.0.1:{httpd.server_address[1]}") as proxy:
            fetching = proxy.hold("GET", "/crash.zip")
            params = [{"seconds": 0, "code": 0, "marks": str(scene.marks)}]
            await scene.start_driver({"uri": f"{proxy.url}/crash.zip", "params": params})
            await _wait_event(fetching)
            await scene.kill_driver()
            assert await scene.recover_and_check(expect_runs=0) == []
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- sweeps ---------------------------------------------------------------------------------


async def test_killed_while_a_sweep_runs(tmp_path: Path, tracking_uri: str) -> None:
    """The sweep's parent run is journaled too: recover records it KILLED."""
    scene = Scene(tmp_path, tracking_uri)
    argv = [
        sys.executable, "-m", "aioproj.cli", "sweep", str(scene.project),
        "-P", "seconds=0,60", "-P", "code=0", "-P", f"marks={scene.marks}",
        "--env-manager", "local", "--progress", "lines",
    ]  # fmt: skip
    await scene.start_driver({}, argv)
    await scene.wait_started(2)
    await scene.kill_driver()
    records = await scene.recover_and_check(expect_runs=3)
    (parent,) = [r for r in records if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"
    assert "during the sweep" in parent.data.tags["aioproj.recovered"]


async def test_killed_while_the_sweep_parent_is_being_ended(
    tmp_path: Path, server_proxy: FaultProxy
) -> None:
    scene = Scene(tmp_path, server_proxy.url)
    argv = [
        sys.executable, "-m", "aioproj.cli", "sweep", str(scene.project),
        "-P", "seconds=0", "-P", "code=0,5", "-P", f"marks={scene.marks}",
        "--env-manager", "local", "--progress", "lines",
    ]  # fmt: skip
    # Two trials end (two updates go through), then the parent's end is held.
    ending = server_proxy.hold("POST", "/runs/update", after=2)
    await scene.start_driver({}, argv)
    await _wait_event(ending)
    await scene.kill_driver()
    server_proxy.clear()
    records = await scene.recover_and_check(expect_runs=3)
    assert "RUNNING" not in {r.info.status for r in records}
