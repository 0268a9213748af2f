"""The edge to Slurm: its commands (sbatch, squeue, sacct, scontrol, scancel), run as
processes, their answers parsed, their failures turned into :class:`BackendError` with
Slurm's own message.

At most a few commands run at once (a burst of submissions does not start a hundred
sbatch processes against slurmctld), and every command is counted by name, so tests and
benchmarks can see what a poll round costs.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import anyio
import anyio.to_thread

from aioproj._threads import run_short
from aioproj.errors import BackendError

from ._state import JobInfo, normalize_state, parse_exit_code

__all__ = ["CommandResult", "SlurmCli", "parse_job_id", "parse_sacct", "parse_squeue"]

logger = logging.getLogger("aioproj.slurm")

#: One line per job, array tasks one each: id, raw id, state, reason.
SQUEUE_FORMAT = "%i|%A|%T|%r"
_SACCT_FIELDS = "JobID,State,ExitCode"
#: What sacct says when the cluster has no slurmdbd.
_NO_ACCOUNTING = "accounting storage is disabled"


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class QueueRow:
    """One job in ``squeue``'s answer: ``raw_id`` is an array task's own job id."""

    raw_id: str
    info: JobInfo


def parse_job_id(stdout: str) -> str:
    """The job id ``sbatch --parsable`` printed (``123``, or ``123;cluster``).

    Raises :class:`BackendError` if there is none.
    """
    line = stdout.strip().splitlines()[-1:] or [""]
    job = line[0].split(";", 1)[0].strip()
    if not job.isdigit():
        raise BackendError(f"sbatch answered without a job id: {stdout.strip()[:200]!r}")
    return job


def parse_squeue(stdout: str) -> dict[str, QueueRow]:
    """``squeue -o '%i|%A|%T|%r'`` lines by job id (``123``, or ``123_4`` for an array
    task). Lines of another form are skipped. Pure."""
    rows: dict[str, QueueRow] = {}
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or not parts[0]:
            continue
        job, raw, state, reason = parts
        rows[job] = QueueRow(raw, JobInfo(state=normalize_state(state), reason=reason.strip()))
    return rows


def parse_sacct(stdout: str) -> dict[str, JobInfo]:
    """``sacct -n -P -o JobID,State,ExitCode`` lines by job id; job steps (``123.batch``)
    are skipped. Pure."""
    jobs: dict[str, JobInfo] = {}
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0] or "." in parts[0]:
            continue
        code = parse_exit_code(parts[2])
        jobs[parts[0]] = JobInfo(
            state=normalize_state(parts[1]),
            exit_code=None if code is None else code[0],
            signal=None if code is None else code[1],
        )
    return jobs


def _scontrol_fields(stdout: str) -> dict[str, str]:
    fields = {}
    for word in stdout.split():
        key, sep, value = word.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def _message(result: CommandResult) -> str:
    lines = [
        line.strip()
        for line in (result.stderr or result.stdout).splitlines()
        if line.strip() and not line.startswith("Try ")
    ]
    return "; ".join(lines)[:2000] or f"exit status {result.returncode}"


class SlurmCli:
    """Slurm's commands for one backend. ``calls`` counts the commands run, by name
    (``squeue``, ``sacct``, ``scontrol``...), ``status_calls`` those that asked for the
    state of jobs. ``env`` is put over this process's environment for every command
    (``SLURM_CONF`` of another cluster)."""

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
    ) -> None:
        self._env = dict(env or {})
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._timeout = timeout
        self.calls: collections.Counter[str] = collections.Counter()
        self.status_calls = 0
        self._paths: dict[str, str] = {}
        #: How ended jobs are looked up: "sacct" (slurmdbd), "jobcomp" (``sacct -c``) or
        #: "scontrol" (neither works: only jobs still in slurmctld's memory).
        self.accounting: str | None = None

    async def which(self, name: str) -> str:
        """The path of Slurm's command ``name``. Raises :class:`BackendError` if it is not
        on PATH (looked up once, in a worker thread)."""
        path = self._paths.get(name)
        if path is None:
            found = await anyio.to_thread.run_sync(shutil.which, name)
            if found is None:
                raise BackendError(
                    f"Slurm's {name} is not on PATH: the slurm backend submits and follows "
                    "jobs with sbatch, squeue and scancel. Run aioproj on a machine of the "
                    "cluster (a login node), or add Slurm's bin directory to PATH."
                )
            path = self._paths[name] = found
        return path

    async def run(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        time_limit: float | None = None,
    ) -> CommandResult:
        """Run Slurm's ``name`` with ``args``; its exit status is the caller's to judge.

        Raises :class:`BackendError` if the command is missing, cannot start or does not
        answer within the timeout (it is killed then). Cancellation kills it.
        """
        path = await self.which(name)
        self.calls[name] += 1
        if env is None and self._env:
            env = command_env(self._env)
        elif env is not None and self._env:
            env = {**env, **self._env}
        async with self._limiter:
            try:
                with anyio.fail_after(time_limit or self._timeout):
                    done = await anyio.run_process(
                        [path, *args],
                        stdin=subprocess.DEVNULL,
                        env=dict(env) if env is not None else None,
                        check=False,
                    )
            except TimeoutError:
                raise BackendError(
                    f"Slurm's {name} did not answer within {time_limit or self._timeout:g} s; "
                    "is slurmctld up?"
                ) from None
            except OSError as exc:
                raise BackendError(f"Could not run Slurm's {name} ({path}): {exc}") from exc
        return CommandResult(
            done.returncode,
            done.stdout.decode("utf-8", "replace"),
            done.stderr.decode("utf-8", "replace"),
        )

    # -- submitting -------------------------------------------------------------------

    async def test_only(self, options: Sequence[str], script: str) -> None:
        """Let sbatch check ``options`` and the script text ``script`` without submitting
        anything (``--test-only``). Raises :class:`BackendError` with sbatch's message."""
        # A file, not stdin: sbatch exits without reading stdin when an option is wrong.
        path = await run_short(_temp_script, script)
        try:
            result = await self.run("sbatch", ["--test-only", *options, "--output=/dev/null", path])
        finally:
            with anyio.CancelScope(shield=True):
                await run_short(os.unlink, path)
        if result.returncode != 0:
            raise BackendError(f"sbatch refused the job: {_message(result)}")

    async def submit(self, options: Sequence[str], script: str, env: Mapping[str, str]) -> str:
        """``sbatch --parsable`` the script file ``script``; its job id.

        ``env`` is the environment of sbatch, which it passes on to the job.
        Raises :class:`BackendError` with sbatch's message if it refused the job.
        """
        result = await self.run("sbatch", ["--parsable", *options, script], env=env)
        if result.returncode != 0:
            raise BackendError(f"sbatch refused the job: {_message(result)}")
        return parse_job_id(result.stdout)

    async def cancel(self, jobs: Iterable[str]) -> None:
        """``scancel`` the jobs. Jobs that have ended or that Slurm forgot are no error.
        Raises :class:`BackendError` with scancel's message otherwise."""
        ids = list(jobs)
        if not ids:
            return
        result = await self.run("scancel", ids)
        if result.returncode != 0 and not all(
            "completed" in line or "Invalid job id" in line
            for line in result.stderr.splitlines()
            if line.strip()
        ):
            raise BackendError(f"scancel {' '.join(ids)} failed: {_message(result)}")

    async def cluster_name(self) -> str | None:
        """The cluster's name (``ClusterName``), or None if scontrol does not say."""
        result = await self.run("scontrol", ["show", "config"])
        if result.returncode != 0:
            return None
        for line in result.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "ClusterName":
                return value.strip() or None
        return None

    # -- following --------------------------------------------------------------------

    async def queue(self) -> dict[str, QueueRow]:
        """Every job of this user that slurmctld still holds, ended ones included (for
        ``MinJobAge``), array tasks one by one: one ``squeue`` call whatever their number.

        Raises :class:`BackendError` with squeue's message if it fails.
        """
        self.status_calls += 1
        result = await self.run("squeue", ["--me", "-h", "-t", "all", "-r", "-o", SQUEUE_FORMAT])
        if result.returncode != 0:
            raise BackendError(f"squeue failed: {_message(result)}")
        return parse_squeue(result.stdout)

    async def find(self, name: str) -> str | None:
        """The id of this user's job named ``name`` that slurmctld still holds, or None.
        Raises :class:`BackendError` with squeue's message if it fails."""
        self.status_calls += 1
        result = await self.run("squeue", ["--me", "-h", "-t", "all", "-n", name, "-o", "%i"])
        if result.returncode != 0:
            raise BackendError(f"squeue failed: {_message(result)}")
        jobs = result.stdout.split()
        return jobs[-1] if jobs else None

    async def ended(self, jobs: Mapping[str, str]) -> dict[str, JobInfo]:
        """How ``jobs`` ended (state and exit code), keyed as given; ``jobs`` maps each
        job id (``123``, ``123_4``) to its raw id (``127``: what ``sacct -c`` knows an
        array task by). One command for all of them: ``sacct`` where slurmdbd keeps
        accounts, else ``sacct -c`` (the job-completion log), else ``scontrol show job``
        for each (only jobs still in slurmctld's memory). Jobs no source knows are left
        out. Raises nothing for a source that fails: the next is tried.
        """
        if not jobs:
            return {}
        if self.accounting in (None, "sacct"):
            self.status_calls += 1
            result = await self.run(
                "sacct", ["-n", "-P", "-X", "-o", _SACCT_FIELDS, "-j", ",".join(jobs)]
            )
            if result.returncode == 0:
                self.accounting = "sacct"
                found = parse_sacct(result.stdout)
                return {job: found[job] for job in jobs if job in found}
            if _NO_ACCOUNTING not in result.stderr and _NO_ACCOUNTING not in result.stdout:
                logger.warning("sacct failed: %s", _message(result))
                return {}
            self.accounting = "jobcomp"
        if self.accounting == "jobcomp":
            raw = {r: job for job, r in jobs.items() if r}
            if not raw:
                return {}
            self.status_calls += 1
            result = await self.run(
                "sacct", ["-c", "-n", "-P", "-o", _SACCT_FIELDS, "-j", ",".join(raw)]
            )
            if result.returncode == 0:
                found = parse_sacct(result.stdout)
                return {raw[r]: found[r] for r in raw if r in found}
            logger.info("sacct -c failed (%s); asking scontrol", _message(result))
            self.accounting = "scontrol"
        out = {}
        for job in jobs:
            self.status_calls += 1
            result = await self.run("scontrol", ["show", "job", "-o", job])
            if result.returncode != 0:
                continue
            fields = _scontrol_fields(result.stdout)
            code = parse_exit_code(fields.get("ExitCode", ""))
            out[job] = JobInfo(
                state=normalize_state(fields.get("JobState", "")),
                reason=fields.get("Reason", ""),
                exit_code=None if code is None else code[0],
                signal=None if code is None else code[1],
            )
        return out


def _temp_script(text: str) -> str:
    fd, path = tempfile.mkstemp(prefix="aioproj-check-", suffix=".sh")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def command_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with ``extra`` over it (what sbatch passes to a job)."""
    return {**os.environ, **extra}
