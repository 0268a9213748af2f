"""The local backend: each run is ``bash -c <command>`` in its own process group.

The engine supervises the process itself (no re-executed CLI per run, unlike MLflow's
asynchronous local runs): output is streamed into the run's output, the exit is awaited
without a thread, and cancellation stops the whole group.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio

from aioproj._marks import MARK_VARIABLE
from aioproj._process import ProcessGroup
from aioproj._redact import redact_credentials, warn
from aioproj._shared import SharedCalls
from aioproj._status import RunStatus
from aioproj.envs import PreparedEnv, prepare_env, select_env_manager
from aioproj.errors import BackendError
from aioproj.project import ResolvedParameters

from .base import Execution, Launch, LaunchRequest, StartRequest

__all__ = ["LocalBackend", "LocalExecution", "LocalLaunch"]

#: MLflow's "=== Running command ... ===" line goes here (the CLI shows it).
logger = logging.getLogger(__name__)


class LocalBackend:
    """Runs projects as local processes. Construct with no arguments, or pass
    ``shell`` to use another POSIX shell than bash."""

    name = "local"
    #: ``path`` parameters given as URIs are downloaded for local runs (MLflow's
    #: ``storage_dir``); the runner does it while :meth:`prepare` runs, and then asks the
    #: launch to run the command with the local paths (:meth:`LocalLaunch.with_parameters`).
    downloads_path_parameters = True
    #: Descriptors each live run keeps open (its output pipe and its pidfd) plus one for
    #: the brief file operations of its tracking; the runner queues runs beyond the limit.
    fds_per_run = 3

    def __init__(self, *, shell: str = "bash") -> None:
        self._shell = shell
        self._shell_path: str | None = None
        self._which = SharedCalls()  # a burst of runs shares the one lookup in flight

    async def prepare(self, request: LaunchRequest) -> Launch:
        """Choose and prepare the environment. Raises EnvironmentBuildError.

        Warns (UserWarning) when ``backend_config`` has keys: the local backend has no
        settings, and MLflow drops them without a word, which hides typos and configs
        meant for another backend.
        """
        if request.backend_config:
            warn(
                "The local backend takes no backend_config; ignoring the keys "
                f"{sorted(map(str, request.backend_config))}. Pass backend_config only to "
                "backends that read it (databricks, kubernetes, plugins).",
                UserWarning,
                stacklevel=2,
            )
        manager = select_env_manager(request.project, request.env_manager)
        # The run does not exist yet while its environment builds: keep the build's
        # output and replay it at the start of the run's log.
        build_output = bytearray()
        env = await prepare_env(
            request.project,
            manager,
            cache_dir=request.env_cache_dir,
            on_output=build_output.extend,
            project_dir=request.source.directory,
            docker_args=request.docker_args,
            build_image=request.build_image,
            docker_auth=request.docker_auth,
            tracking_uri=request.tracking_uri,
            git_commit=request.source.git_commit,
        )
        shell = self._shell_path
        if shell is None:  # PATH lookup stats files: once, off the event loop
            shell = self._shell_path = await self._which.run(
                self._shell, lambda: anyio.to_thread.run_sync(shutil.which, self._shell)
            )
        if shell is None:
            raise BackendError(
                f"The local backend runs commands with {self._shell!r}, which is not on PATH. "
                "Install it, or pass LocalBackend(shell=...) with a POSIX shell that is."
            )
        launch = LocalLaunch(
            shell=shell,
            command=env.wrap(request.parameters.command),
            work_dir=request.source.directory,
            env=env,
            build_output=bytes(build_output),
        )
        return env.wrap_launch(launch)  # docker_env: also follows the run's container

    async def aclose(self) -> None:
        """Nothing is shared between local runs."""


@dataclass(frozen=True)
class LocalLaunch:
    shell: str
    command: str
    work_dir: Path
    env: PreparedEnv
    #: What building the environment printed (empty when it was already built).
    build_output: bytes = b""

    def with_parameters(self, parameters: ResolvedParameters) -> LocalLaunch:
        """This launch, running the command of ``parameters`` in the same environment."""
        return dataclasses.replace(self, command=self.env.wrap(parameters.command))

    @property
    def tags(self) -> Mapping[str, str]:
        tags = dict(self.env.tags)
        if self.env.tag:
            tags["mlflow.project.env"] = self.env.tag
        return tags

    async def start(self, request: StartRequest) -> Execution:
        """Start the process group. Raises BackendError if it cannot start."""
        if self.build_output:
            request.output.feed(
                self.build_output
                if self.build_output.endswith(b"\n")
                else self.build_output + b"\n"
            )
        # Python in a pipe buffers its output in blocks; runs should stream it line by line
        # as they do on a terminal, unless the user decided otherwise.
        child_env = {
            "PYTHONUNBUFFERED": "1",
            **os.environ,
            **self.env.env_vars,
            **request.tracking_env,
        }
        if request.process_mark is not None:
            child_env[MARK_VARIABLE] = request.process_mark
        command = self.command
        if request.record_exit is not None:
            command = request.record_exit(command)
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "=== Running command '%s' in run with ID '%s' ===",
                redact_credentials(self.command),
                request.run_id,
            )
        try:
            group = await ProcessGroup.start(
                self.shell,
                command,
                cwd=self.work_dir,
                env=child_env,
                on_output=request.output.feed,
            )
        except OSError as exc:
            raise BackendError(
                f"Could not start run {request.run_id} in {self.work_dir}: {exc}"
            ) from exc
        return LocalExecution(group, request.output.close, grace_period=request.grace_period)


class LocalExecution:
    """A local run: its process group, its output and its stop.

    Only :meth:`wait` (the runner's supervising task) reads the output pipe; whoever sees
    the group empty last releases its file descriptors, so a descriptor is never closed
    under a reader.
    """

    waits_for_stop = True

    def __init__(
        self, group: ProcessGroup, close_output: Callable[[], None], *, grace_period: float
    ) -> None:
        self._group = group
        self._close_output = close_output
        self._grace = grace_period
        self._cancelled = False
        self._waiting = False
        self._status = RunStatus.RUNNING
        self._stopped = anyio.Event()
        #: How a failed run ended (its exit status or signal): ``SubmittedRun.status_detail``.
        self.detail: str | None = None

    @property
    def pid(self) -> int:
        """The process id of the group leader (``bash``); also the process group id."""
        return self._group.pid

    @property
    def journal_state(self) -> dict[str, int]:
        """What ``aioproj recover`` needs to find the run's processes if the driver dies."""
        return {"pgid": self._group.pid}

    def status(self) -> RunStatus:
        return self._status

    async def wait(self) -> RunStatus:
        group = self._group
        self._waiting = True
        try:
            code = await group.follow(self._grace)
        finally:
            self._waiting = False
            if group.empty:
                self._finish()
        if self._cancelled:
            self._status = RunStatus.KILLED
        else:
            self._status = RunStatus.FINISHED if code == 0 else RunStatus.FAILED
            if code:
                self.detail = _exit_detail(code)
        return self._status

    async def cancel(self) -> None:
        if self._stopped.is_set():
            return
        self._cancelled = True
        await self._group.stop(self._grace)
        if self._waiting:
            await self._stopped.wait()  # wait() drains the pipe and finishes up
        else:
            self._finish()
        self._status = RunStatus.KILLED

    def _finish(self) -> None:
        """Once the group is empty: release its descriptors and end the output."""
        if self._stopped.is_set():
            return
        self._group.close()
        self._close_output()
        self._stopped.set()


def _exit_detail(code: int) -> str:
    """How a command ended, in words: ``exit status 2``, ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
