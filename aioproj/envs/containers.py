"""The containers of docker_env runs: labelled, stopped and removed on every path.

``docker run`` is only a client. Killing it (the local backend's SIGKILL after the grace
period, a driver that dies) leaves its container running, and the SIGTERM it passes on is
ignored by a process that runs as PID 1 without a handler for it (``python train.py`` in
a container). So every container aioproj starts carries the label
``aioproj.run_id=<run id>``, and:

* cancelling a run (``run.cancel()``, a timeout, Ctrl-C, a runner that closes) runs
  ``docker stop --time <grace period>`` on the run's containers while the local backend
  stops the docker CLI, then ``docker rm -f`` on anything left;
* a run that ends by itself is checked for leftovers too (a CLI that died before its
  container, a container created by a CLI that was killed while creating it);
* ``aioproj recover`` stops the containers of a dead driver's runs,
  with :func:`stop_run_containers`.

The values that may be secret reach the container through the run's env file (see
:mod:`aioproj.envs.docker`): created at start in a private directory (mode 0700; on the
memory-backed ``/dev/shm`` where there is one) named after the run, mounted read-only,
and removed when the run ends, whichever way it ends (by ``aioproj recover``, which
finds it by the run id, after a crash).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from aioproj._threads import run_short
from aioproj.errors import BackendError

from .docker_cli import docker_output

if TYPE_CHECKING:
    from aioproj._status import RunStatus
    from aioproj.backends.base import Execution, Launch, StartRequest

__all__ = [
    "ENV_FILE_VAR",
    "RUN_ID_LABEL",
    "ContainerExecution",
    "ContainerLaunch",
    "env_file_text",
    "recover_containers",
    "stop_run_containers",
]

#: The label of every container aioproj starts: its run's id (found again by it).
RUN_ID_LABEL = "aioproj.run_id"
#: The host variable naming the run's env file (set for the docker CLI at start).
ENV_FILE_VAR = "AIOPROJ_DOCKER_ENV_FILE"

logger = logging.getLogger("aioproj")

#: Seconds to wait for docker to finish removing a stopped ``--rm`` container.
_REMOVAL_WAIT = 10.0
_SHM = "/dev/shm"


async def run_containers(docker: str, run_id: str) -> list[str]:
    """Ids of the containers (running or not) labelled with ``run_id``.

    Raises :class:`BackendError` if docker cannot list them.
    """
    code, output = await docker_output(
        [docker, "ps", "-aq", "--no-trunc", "--filter", f"label={RUN_ID_LABEL}={run_id}"],
        cwd=Path("/"),
    )
    if code != 0:
        raise BackendError(
            f"Could not list the docker containers of run {run_id} (`docker ps` exit "
            f"code {code}): {output.strip()[-2000:]}"
        )
    return output.split()


async def stop_run_containers(
    run_id: str, *, grace_period: float, docker: str | None = None
) -> int:
    """Stop and remove every container labelled with ``run_id``; return how many there were.

    ``docker stop`` gives each one ``grace_period`` seconds after SIGTERM before SIGKILL;
    then they are removed (``docker rm -f``), and listed again until none is left.
    Raises :class:`BackendError` if docker is not on PATH, cannot list the containers or
    leaves one behind. Cancellation kills the docker command in progress.
    """
    docker = docker or await anyio.to_thread.run_sync(shutil.which, "docker")
    if docker is None:
        raise BackendError(
            f"Cannot look for the containers of run {run_id}: docker is not on PATH."
        )
    found = await run_containers(docker, run_id)
    if not found:
        return 0
    seconds = str(max(0, math.ceil(grace_period)))
    # Errors are expected here: a --rm container removes itself once stopped.
    await docker_output([docker, "stop", "--time", seconds, *found], cwd=Path("/"))
    with anyio.move_on_after(_REMOVAL_WAIT):
        while left := await run_containers(docker, run_id):
            await docker_output([docker, "rm", "-f", *left], cwd=Path("/"))
            await anyio.sleep(0.1)
    left = await run_containers(docker, run_id)
    if left:
        raise BackendError(
            f"docker did not remove the container(s) {', '.join(c[:12] for c in left)} of "
            f"run {run_id}; remove them with `docker rm -f`."
        )
    return len(found)


async def recover_containers(
    run_id: str, state: Mapping[str, Any], *, grace_period: float, dry_run: bool
) -> int:
    """For ``aioproj recover``: stop the containers of a local run whose driver died.

    ``state`` is the run's journal state (:attr:`ContainerExecution.journal_state`).
    Returns how many containers it found (and, unless ``dry_run``, stopped and removed);
    removes the run's env file too. Raises :class:`BackendError` as
    :func:`stop_run_containers`. Cancellation: as :func:`stop_run_containers`.
    """
    docker = state.get("docker")
    if not isinstance(docker, str):
        return 0
    if dry_run:
        return len(await run_containers(docker, run_id))
    count = await stop_run_containers(run_id, grace_period=grace_period, docker=docker)
    await run_short(_remove_env_dirs_of, run_id)
    return count


def _env_parent() -> str:
    """Where env-file directories go: memory-backed /dev/shm if usable, else the temp dir."""
    if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK | os.X_OK):
        return _SHM
    return tempfile.gettempdir()


def _env_prefix(run_id: str) -> str:
    return f"aioproj-docker-env-{run_id}-"


def _remove_env_dirs_of(run_id: str) -> None:
    """Remove the env-file directories of ``run_id`` that this user owns (blocking)."""
    parent = Path(_env_parent())
    for directory in parent.glob(_env_prefix(run_id) + "*"):
        with contextlib.suppress(OSError):
            if directory.is_dir() and directory.stat().st_uid == os.getuid():
                shutil.rmtree(directory, ignore_errors=True)


def _write_env_file(run_id: str, values: Mapping[str, str]) -> Path:
    """A new private directory holding the env file; returns the file's path (blocking).

    The directory's name starts with the run id (``aioproj recover`` finds it by that
    after a crash) and ends with a random part: mkdtemp creates it, mode 0700, and never
    reuses one that exists, so nobody can prepare it in a shared directory.
    """
    directory = Path(tempfile.mkdtemp(prefix=_env_prefix(run_id), dir=_env_parent()))
    path = directory / "env"
    try:
        # Readable by whatever user the image runs as: the 0700 directory is the fence.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(env_file_text(values))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return path


def _remove_env_dir(directory: Path) -> None:
    if directory.name.startswith("aioproj-docker-env-"):
        shutil.rmtree(directory, ignore_errors=True)


def env_file_text(values: Mapping[str, str]) -> str:
    """The env file: one ``export NAME='value'`` line per variable, for ``/bin/sh``.

    Names are those an MLproject or aioproj accepts (checked when parsed); values are
    single-quoted, so the shell reads them as data whatever they hold. Raises nothing.
    """
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in values.items())


class ContainerLaunch:
    """A local launch of a docker_env run: writes its env file, and follows its container."""

    def __init__(
        self,
        inner: Launch,
        *,
        docker: str,
        file_env_names: Sequence[str] = (),
        defined: Mapping[str, str] | None = None,
    ) -> None:
        self._inner = inner
        self._docker = docker
        #: The variables that reach the container through the env file (none: no file).
        self._file_env_names = tuple(file_env_names)
        #: The values ``docker_env.environment`` sets (may be secret).
        self._defined = dict(defined or {})

    @property
    def tags(self) -> Mapping[str, str]:
        return self._inner.tags

    @property
    def journal_state(self) -> dict[str, Any]:
        """Noted with the run's intent, before anything exists: if the driver dies while
        the run starts, ``aioproj recover`` still looks for its container."""
        state = dict(getattr(self._inner, "journal_state", None) or {})
        state["docker"] = self._docker
        return state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # what else the backend's launch offers

    async def start(self, request: StartRequest) -> Execution:
        """Write the env file, start the run. Raises as the wrapped launch; a failed or
        cancelled start removes the env file."""
        env_dir: Path | None = None
        if self._file_env_names:
            merged = {**os.environ, **self._defined, **request.tracking_env}
            values = {n: merged[n] for n in self._file_env_names if n in merged}
            env_file = await run_short(_write_env_file, request.run_id, values)
            env_dir = env_file.parent
            request = replace(
                request, tracking_env={**request.tracking_env, ENV_FILE_VAR: str(env_file)}
            )
        try:
            execution = await self._inner.start(request)
        except BaseException:
            if env_dir is not None:
                with anyio.CancelScope(shield=True):
                    await run_short(_remove_env_dir, env_dir)
            raise
        return ContainerExecution(
            execution,
            docker=self._docker,
            run_id=request.run_id,
            env_dir=env_dir,
            grace_period=request.grace_period,
        )


class ContainerExecution:
    """A docker_env run on the local backend: the docker CLI's process group (the wrapped
    execution) and the container it started, which has to be stopped on its own."""

    def __init__(
        self,
        inner: Execution,
        *,
        docker: str,
        run_id: str,
        env_dir: Path | None,
        grace_period: float,
    ) -> None:
        self._inner = inner
        self._docker = docker
        self._run_id = run_id
        self._env_dir = env_dir
        self._grace = grace_period
        self._cleaned = False
        self.waits_for_stop = inner.waits_for_stop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # pid, detail, ... of the wrapped execution

    @property
    def journal_state(self) -> dict[str, Any]:
        """The wrapped run's state, plus what ``aioproj recover`` needs for the container."""
        state = dict(getattr(self._inner, "journal_state", None) or {})
        state["docker"] = self._docker
        if self._env_dir is not None:
            state["docker_env_dir"] = str(self._env_dir)
        return state

    def status(self) -> RunStatus:
        return self._inner.status()

    async def wait(self) -> RunStatus:
        """Follow the docker CLI to its end, then make sure no container of the run is
        left. Cancellation: propagates at once (the runner then calls :meth:`cancel`)."""
        status = await self._inner.wait()
        await self._clean_up()
        return status

    async def cancel(self) -> None:
        """Stop the container (``docker stop``) and the CLI together, then remove what is
        left. Idempotent; errors of docker are logged, never raised."""
        if self._cleaned:
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._stop_containers)
            tg.start_soon(self._inner.cancel)
        await self._clean_up()

    async def _stop_containers(self) -> None:
        try:
            await stop_run_containers(self._run_id, grace_period=self._grace, docker=self._docker)
        except BackendError as exc:
            logger.error("Run %s: %s", self._run_id, exc)

    async def _clean_up(self) -> None:
        """Remove the run's containers and env file, once; shielded."""
        if self._cleaned:
            return
        with anyio.CancelScope(shield=True):
            try:
                await stop_run_containers(self._run_id, grace_period=0, docker=self._docker)
            except BackendError as exc:
                logger.error("Run %s: %s", self._run_id, exc)
            finally:
                if self._env_dir is not None:
                    with contextlib.suppress(OSError):
                        await run_short(_remove_env_dir, self._env_dir)
                self._cleaned = True
