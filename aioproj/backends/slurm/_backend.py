"""The Slurm backend: each run is a batch job (a task of a job array for a sweep's trials).

``prepare`` checks the backend_config, builds the environment once on the shared
filesystem and lets ``sbatch --test-only`` judge the options before anything is tracked.
``start`` writes the batch script into the run's directory on the shared filesystem and
submits it with ``sbatch --parsable``; the run is then followed by the backend's shared
poller, and its output file tailed into ``run.logs()``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from aioproj._shared import SharedCalls
from aioproj._status import RunStatus
from aioproj._threads import run_short
from aioproj.backends.base import Execution, LaunchRequest, StartRequest
from aioproj.backends.batch import current_batch
from aioproj.envs import PreparedEnv, prepare_env, select_env_manager
from aioproj.errors import AioprojError, BackendError, InvalidArgumentError
from aioproj.project import EnvType
from aioproj.tracking import TrackingStore

from ._arrays import ArrayCollector
from ._cli import SlurmCli, command_env
from ._config import SlurmConfig, load_config
from ._execution import JobFiles, SharedFiles, SlurmExecution, remove_files
from ._poller import Poller
from ._script import RunPart, render_array_script, render_script
from ._state import JobInfo

__all__ = ["JOB_ID_TAG", "SlurmBackend", "SlurmLaunch"]

logger = logging.getLogger("aioproj.slurm")

#: The tags a run gets: its job (``123``, or ``123_4`` for an array task) and cluster.
JOB_ID_TAG = "slurm_job_id"
CLUSTER_TAG = "slurm_cluster"
#: Set per run in its script; everything else of the tracking environment goes through
#: sbatch's environment (it may hold credentials).
_RUN_VARS = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")
_UNKNOWN = object()


def _write_script(directory: Path, name: str, text: str) -> Path:
    """Write ``text`` as the executable script ``name`` in a new private ``directory``."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.mkdir(mode=0o700)
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class SlurmBackend:
    """Runs projects as Slurm batch jobs. Construct with no arguments.

    ``poll_interval`` is the (shortest, longest) seconds between rounds of the shared
    status poll; ``concurrency`` bounds the Slurm commands running at once;
    ``array_window`` is how long the first run of a sweep's batch waits for the others
    (quiet seconds, longest seconds) before their array is submitted.

    Raises InvalidArgumentError for a bad ``poll_interval``.
    """

    name = "slurm"
    #: A sweep's trials come as one batch and go out as one job array (see
    #: :mod:`aioproj.backends.batch`).
    submits_batches = True

    def __init__(
        self,
        *,
        poll_interval: tuple[float, float] = (0.5, 15.0),
        concurrency: int = 8,
        array_window: tuple[float, float] = (0.25, 5.0),
    ) -> None:
        low, high = poll_interval
        if not 0 < low <= high:
            raise InvalidArgumentError(
                f"poll_interval must be (shortest, longest) seconds with 0 < shortest <="
                f" longest, got {poll_interval!r}."
            )
        self.cli = SlurmCli(concurrency=concurrency)
        self.poller = Poller(self.cli, min_interval=float(low), max_interval=float(high))
        self._checks = SharedCalls()
        self._checked: set[str] = set()
        self._cluster: object = _UNKNOWN
        self._tag_stores: dict[str, TrackingStore] = {}
        self._arrays: ArrayCollector[tuple[SlurmLaunch, StartRequest], SlurmExecution] = (
            ArrayCollector(self._submit_array, quiet=array_window[0], longest=array_window[1])
        )

    def __repr__(self) -> str:
        return f"SlurmBackend(active={self.poller.active})"

    async def prepare(self, request: LaunchRequest) -> SlurmLaunch:
        """Check the backend_config, find Slurm's commands, prepare the environment on
        the shared filesystem, and let ``sbatch --test-only`` check the job.

        Raises:
            BackendError: an unknown key or a bad value in backend_config (listing the
                keys it reads), a template that cannot be used, a docker project, no
                ``sbatch``/``squeue``/``scancel`` on PATH, a job sbatch refuses (an
                unknown partition, an option it does not know: Slurm's message).
            EnvironmentBuildError: the environment cannot be built.
        Nothing is tracked or submitted; cancellation stops an environment build.
        """
        config = await anyio.to_thread.run_sync(load_config, request.backend_config)
        if request.project.env_type is EnvType.DOCKER:
            raise BackendError(
                "The slurm backend does not run docker_env projects: compute nodes rarely "
                "have a docker daemon. Use a python_env or conda environment (or "
                "env_manager='local' with a container image your site provides)."
            )
        for command in ("sbatch", "squeue", "scancel"):
            await self.cli.which(command)
        manager = select_env_manager(request.project, request.env_manager)
        build_output = bytearray()
        env = await prepare_env(
            request.project,
            manager,
            cache_dir=config.shared_dir / "envs",
            on_output=build_output.extend,
            project_dir=request.source.directory,
            tracking_uri=request.tracking_uri,
            git_commit=request.source.git_commit,
        )
        launch = SlurmLaunch(
            backend=self,
            config=config,
            env=env,
            command=env.wrap(request.parameters.command),
            work_dir=request.source.directory,
            tracking_uri=request.tracking_uri,
            build_output=bytes(build_output),
        )
        await self._check(launch)
        cluster = await self._cluster_name()
        if cluster:
            launch.launch_tags[CLUSTER_TAG] = cluster
        return launch

    async def _check(self, launch: SlurmLaunch) -> None:
        """``sbatch --test-only`` once for each set of options and template."""
        config = launch.config
        probe = render_script(
            RunPart("0" * 32, "0", str(launch.work_dir), "true"),
            modules=config.modules,
            template=config.template,
        )
        key = json.dumps([config.options, config.template or ""])
        if key in self._checked:
            return

        async def check() -> None:
            await self.cli.test_only([*config.options, "--job-name=mlflow-check"], probe)
            self._checked.add(key)

        await self._checks.run(key, check)

    async def _cluster_name(self) -> str | None:
        if self._cluster is _UNKNOWN:
            name = await self._checks.run("\0cluster", self.cli.cluster_name)
            self._cluster = name
        return self._cluster if isinstance(self._cluster, str) else None

    async def submit_batch(
        self, members: Sequence[tuple[SlurmLaunch, StartRequest]], max_parallel: int
    ) -> list[SlurmExecution]:
        """Submit prepared, tracked runs as one job array (``--array=0-N%max_parallel``);
        their executions, in order. All members must share a backend_config. One member
        is submitted as a plain job.

        Raises :class:`BackendError` with sbatch's message if it refused the array; then
        nothing is submitted and the array's files are removed.
        """
        return await self._submit_array(list(members), max_parallel)

    async def _submit_array(
        self, members: list[tuple[SlurmLaunch, StartRequest]], max_parallel: int
    ) -> list[SlurmExecution]:
        if len(members) == 1:
            return [await self._submit_one(*members[0])]
        launch, first = members[0]
        config = launch.config
        name = f"array-{uuid.uuid4().hex[:12]}"
        directory = config.shared_dir / "jobs" / name
        text = render_array_script(
            [m.part(r) for m, r in members], modules=config.modules, template=config.template
        )
        script = await run_short(_write_script, directory, config.script_name, text)
        count = len(members)
        limit = f"%{max_parallel}" if 0 < max_parallel < count else ""
        options = [
            *config.options,
            f"--job-name=mlflow-{name}",
            f"--output={directory}/%a.log",
            f"--array=0-{count - 1}{limit}",
        ]
        try:
            job = await self.cli.submit(options, str(script), command_env(launch.sbatch_env(first)))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await run_short(remove_files, (str(directory),))
            raise
        shared = SharedFiles((str(directory),), users=count)
        return [
            self._execution(
                m,
                r,
                f"{job}_{i}",
                directory / f"{i}.log",
                JobFiles((str(directory / f"{i}.log"),), shared),
            )
            for i, (m, r) in enumerate(members)
        ]

    async def _submit_one(self, launch: SlurmLaunch, request: StartRequest) -> SlurmExecution:
        config = launch.config
        directory = config.shared_dir / "jobs" / request.run_id
        text = render_script(launch.part(request), modules=config.modules, template=config.template)
        try:
            script = await run_short(_write_script, directory, config.script_name, text)
        except OSError as exc:
            raise BackendError(
                f"Could not write the batch script of run {request.run_id} in {directory}"
                f" (the slurm backend's shared_dir): {exc}"
            ) from exc
        log = directory / "output.log"
        options = [*config.options, f"--job-name=mlflow-{request.run_id}", f"--output={log}"]
        files = JobFiles((str(directory),))
        try:
            job = await self.cli.submit(
                options, str(script), command_env(launch.sbatch_env(request))
            )
        except BaseException:
            await files.release()
            raise
        return self._execution(launch, request, job, log, files)

    def _execution(
        self,
        launch: SlurmLaunch,
        request: StartRequest,
        job: str,
        log: Path,
        files: JobFiles,
    ) -> SlurmExecution:
        async def set_tags(tags: Mapping[str, str]) -> None:
            await self._set_tags(launch.tracking_uri, request.run_id, tags)

        execution = SlurmExecution(
            job_id=job,
            cli=self.cli,
            poller=self.poller,
            output=request.output,
            log_path=log,
            files=files,
            set_tags=set_tags,
        )
        # What `aioproj recover` needs to ask Slurm if this process dies.
        execution.journal_state = {
            "job_id": job,
            "files": files.journal,
            "slurm_conf": os.environ.get("SLURM_CONF"),
        }
        return execution

    async def _set_tags(self, uri: str, run_id: str, tags: Mapping[str, str]) -> None:
        from aioproj.tracking import open_store

        store = self._tag_stores.get(uri)
        if store is None:
            store = await anyio.to_thread.run_sync(open_store, uri)
            store = self._tag_stores.setdefault(uri, store)
        await store.set_tags(run_id, tags)

    async def recover(self, state: Mapping[str, Any]) -> RunStatus | None:
        """The real end of a run whose driver died (see :func:`aioproj.recover`).

        ``state`` is the run's journal entry (job id, files, ``SLURM_CONF``, the shared
        directory, the MLflow run id). Asks ``squeue`` and, for a job slurmctld no longer
        holds, the accounts (``sacct``, ``sacct -c``): FINISHED, FAILED or KILLED once the
        job has ended (then its files are removed), None while it is pending or running.
        FAILED if Slurm no longer knows the job, or if the driver died before it noted
        the job and no job carries the run's name (it was never submitted). Raises
        BackendError if Slurm cannot be asked.
        """
        conf = state.get("slurm_conf")
        cli = SlurmCli(env={"SLURM_CONF": conf} if isinstance(conf, str) and conf else None)
        files = [str(f) for f in state.get("files") or [] if isinstance(f, str)]
        job = state.get("job_id")
        if not isinstance(job, str) or not job:
            # The driver died between sbatch and noting the job: a job of its own (not an
            # array task) has the run's name.
            run_id, shared = state.get("mlflow_run_id"), state.get("shared_dir")
            if isinstance(run_id, str) and isinstance(shared, str):
                files.append(str(Path(shared) / "jobs" / run_id))
            found = await cli.find(f"mlflow-{run_id}") if isinstance(run_id, str) else None
            if found is None:
                await run_short(remove_files, tuple(files))
                return RunStatus.FAILED
            job = found
        row = (await cli.queue()).get(job)
        info: JobInfo | None = row.info if row is not None else None
        if info is not None and not info.final:
            return None
        raw = row.raw_id if row is not None else ("" if "_" in job else job)
        found_info = (await cli.ended({job: raw})).get(job)
        if found_info is not None and found_info.final:
            info = (
                found_info
                if info is None
                else JobInfo(info.state, info.reason, found_info.exit_code, found_info.signal)
            )
        await run_short(remove_files, tuple(files))
        if info is None:
            logger.warning("Slurm no longer knows job %s; its run is recorded FAILED", job)
            return RunStatus.FAILED
        return info.status

    async def aclose(self) -> None:
        """Close the tracking stores used for tags. Jobs keep running on the cluster."""
        with anyio.CancelScope(shield=True):
            stores, self._tag_stores = self._tag_stores, {}
            for store in stores.values():
                await store.aclose()


@dataclass
class SlurmLaunch:
    """A run ready to be submitted."""

    backend: SlurmBackend = field(repr=False)
    config: SlurmConfig = field(repr=False)
    env: PreparedEnv
    #: The entry point's command inside its environment.
    command: str
    work_dir: Path
    tracking_uri: str = field(repr=False)
    build_output: bytes = field(default=b"", repr=False)
    launch_tags: dict[str, str] = field(default_factory=dict)

    @property
    def journal_state(self) -> dict[str, object]:
        """What ``aioproj recover`` needs before the job exists: the cluster and the
        shared directory (the job id comes once it is submitted)."""
        return {
            "slurm_conf": os.environ.get("SLURM_CONF"),
            "shared_dir": str(self.config.shared_dir),
        }

    @property
    def tags(self) -> Mapping[str, str]:
        tags = {**self.env.tags, **self.launch_tags}
        if self.env.tag:
            tags["mlflow.project.env"] = self.env.tag
        return tags

    def part(self, request: StartRequest) -> RunPart:
        """This run's part of a batch script."""
        return RunPart(
            run_id=request.run_id,
            experiment_id=request.experiment_id,
            work_dir=str(self.work_dir),
            command=self.command,
            env_vars=dict(self.env.env_vars),
            use_srun=self.config.use_srun,
        )

    def sbatch_env(self, request: StartRequest) -> dict[str, str]:
        """What sbatch's environment adds to this process's for the run (the job gets it
        all, sbatch's default): the tracking variables but the run's ids, and
        backend_config's ``environment``."""
        return {
            "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1"),
            **self.config.environment,
            **{k: v for k, v in request.tracking_env.items() if k not in _RUN_VARS},
        }

    def group_key(self, request: StartRequest) -> str:
        """Runs with the same key can share one job array (a digest: the environment may
        hold credentials)."""
        config = self.config
        text = json.dumps(
            [
                config.options,
                config.modules,
                config.template or "",
                config.script_name,
                str(config.shared_dir),
                config.use_srun,
                sorted(self.sbatch_env(request).items()),
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()

    async def start(self, request: StartRequest) -> Execution:
        """Submit the run (with the other runs of its sweep batch, as a job array, when
        there is one), tag it with its job id, and return its execution.

        Raises :class:`BackendError` with sbatch's message if Slurm refused the job;
        then nothing is left on the cluster or the shared filesystem.
        """
        output = request.output
        if self.build_output:
            output.feed(
                self.build_output
                if self.build_output.endswith(b"\n")
                else self.build_output + b"\n"
            )
        batch = current_batch.get()
        try:
            if batch is not None and self.config.arrays:
                execution = await self.backend._arrays.join(
                    batch, self.group_key(request), (self, request)
                )
            else:
                execution = await self.backend._submit_one(self, request)
        except BackendError as exc:
            raise BackendError(f"Slurm run {request.run_id}: {exc}") from exc
        logger.info("=== Run %s is Slurm job %s ===", request.run_id, execution.job_id)
        output.feed(f"=== Submitted Slurm job {execution.job_id} ===\n".encode())
        try:
            await self.backend._set_tags(
                self.tracking_uri, request.run_id, {JOB_ID_TAG: execution.job_id}
            )
        except AioprojError as exc:
            logger.warning("Could not tag run %s with its Slurm job: %s", request.run_id, exc)
        return execution
