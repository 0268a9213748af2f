"""A real single-node Slurm for the tests: installed, configured, started and stopped here.

:class:`SlurmCluster` brings up ``munged``, ``slurmctld`` and ``slurmd`` with a private
configuration (``SLURM_CONF``) in a temporary directory: its own ports, state, spool, logs
and munge socket, so nothing under /etc or /run is changed. Slurm and munge are installed
with apt-get when missing (we are root in CI). If this machine already runs a Slurm that
answers (``sinfo`` works with the default configuration), that cluster is used and left
alone.

When Slurm cannot be installed (not root, no apt-get) the tests are skipped with the
reason, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import unavailable

__all__ = ["SlurmCluster", "SlurmUnavailable", "slurm"]

PACKAGES = ("slurm-wlm", "munge")
_BINARIES = ("sbatch", "squeue", "scontrol", "scancel", "sacct", "slurmctld", "slurmd", "munged")


class SlurmUnavailable(Exception):
    """Slurm cannot be installed or started on this machine; the message says why."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 30) -> str:
    done = subprocess.run(
        args, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise SlurmUnavailable(
            f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip() or done.stdout}"
        )
    return done.stdout


def _missing_binaries() -> list[str]:
    return [b for b in _BINARIES if shutil.which(b) is None]


def install() -> None:
    """Install slurm-wlm and munge with apt-get if any of their programs is missing.

    Raises SlurmUnavailable when that is impossible (not root, no apt-get) or fails.
    """
    if not _missing_binaries():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"Slurm is not installed ({', '.join(_missing_binaries())} missing) and this is "
            "not root, so apt-get cannot install it"
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]  # another test process may be installing too
    _run(["apt-get", *lock, "update", "-q"], env=env, timeout=600)
    _run(
        ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
        env=env,
        timeout=900,
    )
    missing = _missing_binaries()
    if missing:
        raise SlurmUnavailable(f"apt-get installed {PACKAGES} but {missing} are still missing")


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(int(line.split()[1]) / 1024 * 0.9)
    return 1024


def _config(root: Path, host: str) -> str:
    return "\n".join(
        [
            "ClusterName=aioproj-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={root}/munge/munge.socket",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            # The node declares more CPUs than the machine has: 32 one-CPU jobs at once.
            "SlurmdParameters=config_overrides",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0",
            "MinJobAge=300",
            "KillWait=2",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={root}/log/jobcomp.log",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs=32 Sockets=1 CoresPerSocket=32 "
            f"ThreadsPerCore=1 RealMemory={_memory_mb()} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


class SlurmCluster:
    """A Slurm cluster for tests. ``env`` holds what commands need to reach it
    (``SLURM_CONF`` for a private cluster, nothing for one that was already running)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env: dict[str, str] = {}
        self.conf = root / "slurm.conf"
        self.started = False
        self._munged_pid: int | None = None

    def _cmd_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def up(self, timeout: float = 60.0) -> None:
        """Use the running cluster, or install and start a private one; return once a
        batch job has run on it. Raises SlurmUnavailable."""
        install()
        with contextlib.suppress(SlurmUnavailable, subprocess.TimeoutExpired):
            _run(["sinfo", "-h"], timeout=10)
            self._wait_for_a_job(timeout)
            return  # a cluster that was running already: not ours to stop
        self.start(timeout)

    def start(self, timeout: float = 60.0) -> None:
        host = socket.gethostname().split(".")[0]
        root = self.root
        for sub in ("munge", "state", "spool", "log", "jobs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o700)
        self.conf.write_text(_config(root, host))
        self.env = {"SLURM_CONF": str(self.conf)}
        self.started = True
        try:
            self._start_munged()
            env = self._cmd_env()
            _run(["slurmctld", "-f", str(self.conf)], env=env)
            _run(["slurmd", "-f", str(self.conf), "-N", host], env=env)
            self._wait_for_a_job(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_munged(self) -> None:
        munge = self.root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        _run(
            [
                "munged",
                "--force",
                f"--key-file={key}",
                f"--socket={munge}/munge.socket",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/munged.seed",
            ]
        )
        self._munged_pid = int((munge / "munged.pid").read_text())

    def _wait_for_a_job(self, timeout: float) -> None:
        """Submit ``true`` and wait until it has run (the cluster schedules jobs)."""
        env = self._cmd_env()
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                out = _run(["sbatch", "--parsable", "--output=/dev/null", "--wrap=true"], env=env)
                break
            except SlurmUnavailable as exc:  # slurmctld still starting
                last = str(exc)
                time.sleep(0.2)
        else:
            raise SlurmUnavailable(f"sbatch never accepted a job: {last}\n{self.logs()}")
        job = out.strip().split(";")[0]
        while time.monotonic() < deadline:
            state = _run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], env=env).strip()
            if state == "COMPLETED":
                return
            if state in ("FAILED", "CANCELLED", "NODE_FAIL", "BOOT_FAIL"):
                raise SlurmUnavailable(f"the first job ended {state}\n{self.logs()}")
            time.sleep(0.1)
        raise SlurmUnavailable(f"the first job did not run within {timeout:g} s\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-20:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left of the jobs and wait until they are over (so that their
        slurmstepd can report to slurmd and exit), stop the daemons by their pids, then
        any slurmstepd of this cluster that is still there."""
        if not self.started:
            return
        env = self._cmd_env()
        with contextlib.suppress(SlurmUnavailable, subprocess.TimeoutExpired, OSError):
            active = "PENDING,CONFIGURING,RUNNING,COMPLETING,SUSPENDED"
            jobs = _run(["squeue", "-h", "-t", active, "-o", "%i"], env=env, timeout=10).split()
            if jobs:
                _run(["scancel", *jobs], env=env, timeout=10)
            deadline = time.monotonic() + 15
            while (
                time.monotonic() < deadline
                and _run(["squeue", "-h", "-t", active, "-o", "%i"], env=env, timeout=10).split()
            ):
                time.sleep(0.1)
        pids = [
            self._pid(self.root / "slurmd.pid"),
            self._pid(self.root / "slurmctld.pid"),
            self._munged_pid,
        ]
        _stop_pids([pid for pid in pids if pid is not None], grace=3.0)
        _stop_pids(_steps_of(str(self.conf)), grace=1.0)
        self.started = False

    @staticmethod
    def _pid(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None


def _steps_of(conf: str) -> list[int]:
    """The slurmstepd processes of the cluster whose configuration is ``conf``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if not f.read().startswith(b"slurmstepd"):
                    continue
            with open(f"/proc/{name}/environ", "rb") as f:
                if f"SLURM_CONF={conf}".encode() in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_pids(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM every pid at once, SIGKILL those left after ``grace`` seconds; return once
    they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A single-node Slurm for the session; its ``env`` is set in ``os.environ`` while the
    session runs so that aioproj's sbatch/squeue calls reach it."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.up()
    except SlurmUnavailable as exc:
        unavailable(f"No Slurm: {exc}")
    saved = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        cluster.stop()
