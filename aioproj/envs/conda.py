"""The ``conda`` environment manager: conda, mamba or micromamba, as MLflow drives them.

Which executables (MLflow's rules, see ``reference/mlflow-projects.md`` §1.4):

* conda: ``$MLFLOW_CONDA_HOME/bin/conda`` if ``MLFLOW_CONDA_HOME`` is set, else
  ``$CONDA_EXE``, else ``conda`` on PATH. The directory it is in is "the conda bin dir".
* the create command: ``MLFLOW_CONDA_CREATE_ENV_CMD`` (``mamba``, ``micromamba`` or a
  path), looked up in the conda bin dir when one is known and then on PATH; by default
  the conda executable itself.

The environment is named ``mlflow-<sha1 of the conda.yaml text>`` exactly as MLflow names
it, so environments MLflow created are reused and the other way round. It lives where
conda puts named environments; aioproj only keeps a record directory
``<cache_dir>/conda-<sha1[:16]>`` (with the usual marker once the environment is complete)
and a lock file next to it.

What aioproj adds to MLflow: the check-and-create is single-flight inside the process and
locked across processes (MLflow races here, its issue #2201), so N concurrent runs create
the environment once; a failed or cancelled creation removes the half-made environment;
and an environment left half-made by a crashed aioproj process is removed and rebuilt
instead of being used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from aioproj.errors import EnvironmentBuildError
from aioproj.project import EnvType, Project

from .base import PreparedEnv
from .cache import MARKER_NAME, _file_lock, _write_marker, env_dir_for, is_complete
from .steps import OutputTail, run_step

__all__ = [
    "CondaTools",
    "conda_activate_command",
    "conda_env_name",
    "find_conda_tools",
    "prepare_conda_env",
]

logger = logging.getLogger("aioproj.envs")

OutputCallback = Callable[[bytes], None]

CONDA_HOME_VAR = "MLFLOW_CONDA_HOME"
CREATE_ENV_CMD_VAR = "MLFLOW_CONDA_CREATE_ENV_CMD"

#: Written in the record directory while an environment is being created; found there
#: (under the lock) it means a creation was interrupted and its environment is suspect.
_BUILDING_FLAG = "building"
#: How long a cleanup after a failure or cancellation may take (conda remove can be slow).
_CLEANUP_TIMEOUT = 120.0
#: Executables whose ``--help`` probe has succeeded in this process.
_PROBED: set[str] = set()
#: In-process single flight: record directory and conda → its callers (see _Flight).
_FLIGHTS: dict[str, _Flight] = {}


@dataclass(frozen=True)
class CondaTools:
    """The executables that create and manage conda environments.

    ``bin_dir`` is the conda bin dir when ``CONDA_EXE`` or ``MLFLOW_CONDA_HOME`` names it
    (activation then sources ``<bin_dir>/../etc/profile.d/conda.sh``), else None.
    """

    conda: str
    create: str
    bin_dir: Path | None


def conda_env_name(spec_text: str) -> str:
    """MLflow's name for the environment of a conda.yaml: ``mlflow-<sha1(text)>``."""
    digest = hashlib.sha1(spec_text.encode("utf-8"), usedforsecurity=False).hexdigest()
    return f"mlflow-{digest}"


def conda_activate_command(tools: CondaTools, name: str) -> str:
    """The shell command that activates ``name`` (MLflow's forms; its output goes to stderr)."""
    if tools.bin_dir is not None:
        conda_sh = tools.bin_dir / ".." / "etc" / "profile.d" / "conda.sh"
        return f"source {shlex.quote(str(conda_sh))} && conda activate {shlex.quote(name)} 1>&2"
    return f"source activate {shlex.quote(name)} 1>&2"


async def find_conda_tools(environ: Mapping[str, str] | None = None) -> CondaTools:
    """Resolve and probe (``--help``) conda and the create command.

    Path lookups run in a worker thread. Raises :class:`EnvironmentBuildError` naming
    ``CONDA_EXE`` / ``MLFLOW_CONDA_HOME`` when conda is missing, or
    ``MLFLOW_CONDA_CREATE_ENV_CMD`` when the create command is. Cancellation stops a
    running probe.
    """
    env = dict(os.environ if environ is None else environ)
    tools = await anyio.to_thread.run_sync(_resolve_tools, env)
    await _probe(tools.conda, _missing_conda(tools.conda))
    if tools.create != tools.conda:
        await _probe(tools.create, _missing_create(tools.create, env))
    return tools


async def prepare_conda_env(
    project: Project,
    *,
    cache_dir: Path,
    on_output: OutputCallback | None = None,
) -> PreparedEnv:
    """The conda environment for ``project``'s conda.yaml, created if conda lacks it.

    Creation output goes to ``on_output`` as it comes. Raises
    :class:`EnvironmentBuildError` when conda or the create command is missing, the spec
    cannot be read, or creation fails (with the command and the tail of its output, pip
    errors included; the half-made environment is removed first). Cancellation during
    creation kills the create command's process group and removes the half-made
    environment (shielded) before it propagates; cancellation while waiting for another
    creator simply stops waiting.
    """
    spec_path, spec_text = await _read_spec(project)
    name = conda_env_name(spec_text)
    tools = await find_conda_tools()
    record = env_dir_for(cache_dir, "conda", name.removeprefix("mlflow-"))
    creator = _Creator(tools, name, spec_path, project.directory, record, on_output)
    prefix = await _ensure_once(creator)
    return PreparedEnv(
        manager="conda",
        tag="conda",
        activate=conda_activate_command(tools, name),
        directory=prefix,
    )


# --- resolving and probing the executables -----------------------------------------


def _resolve_tools(env: Mapping[str, str]) -> CondaTools:
    """Blocking (stats PATH): run in a worker thread."""
    home = env.get(CONDA_HOME_VAR)
    conda_exe = env.get("CONDA_EXE")
    if home:
        conda = os.path.join(home, "bin", "conda")
    elif conda_exe:
        conda = conda_exe
    else:
        conda = "conda"
    bin_dir = Path(os.path.dirname(conda)) if (home or conda_exe) else None
    found = _which(conda, env)
    if found is None:
        raise EnvironmentBuildError(_missing_conda(conda))
    create_cmd = env.get(CREATE_ENV_CMD_VAR, "").strip()
    if not create_cmd or create_cmd == "conda":
        return CondaTools(conda=found, create=found, bin_dir=bin_dir)
    create = _find_create(create_cmd, bin_dir, env)
    if create is None:
        raise EnvironmentBuildError(_missing_create(create_cmd, env))
    return CondaTools(conda=found, create=create, bin_dir=bin_dir)


def _find_create(command: str, bin_dir: Path | None, env: Mapping[str, str]) -> str | None:
    """``command`` as a path, else next to conda (as MLflow looks), else on PATH."""
    if os.sep in command:
        return _which(command, env)
    if bin_dir is not None:
        beside = _which(str(bin_dir / command), env)
        if beside is not None:
            return beside
    return _which(command, env)


def _which(command: str, env: Mapping[str, str]) -> str | None:
    return shutil.which(command, path=env.get("PATH", os.defpath))


def _missing_conda(conda: str) -> str:
    return (
        f"Could not find Conda executable at {conda}. Ensure Conda is installed as per the "
        "instructions at https://conda.io/projects/conda/en/latest/user-guide/install/"
        "index.html (or install mamba or micromamba). You can also tell aioproj where it "
        "is: set CONDA_EXE to the conda executable, or MLFLOW_CONDA_HOME to the conda "
        "installation directory (the one holding bin/conda). Or run the project with "
        "env_manager='virtualenv', which installs the pip dependencies of conda.yaml."
    )


def _missing_create(command: str, env: Mapping[str, str]) -> str:
    value = env.get(CREATE_ENV_CMD_VAR, command)
    return (
        f"You have set the env variable {CREATE_ENV_CMD_VAR} to {value!r}, but {command} "
        "does not exist or it is not working properly. Note that it is looked up next to "
        f"the conda executable (set {CONDA_HOME_VAR} or CONDA_EXE to change where) and "
        f"then on PATH; install it there, or unset {CREATE_ENV_CMD_VAR} to create "
        "environments with conda itself."
    )


async def _probe(executable: str, error: str) -> None:
    """Run ``<executable> --help`` once per process; only failing to start is an error
    (as MLflow, the exit code is ignored)."""
    if executable in _PROBED:
        return
    try:
        await anyio.run_process(
            [executable, "--help"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    except OSError as exc:
        raise EnvironmentBuildError(f"{error} ({exc.strerror or exc})") from exc
    _PROBED.add(executable)


# --- the spec ------------------------------------------------------------------------


async def _read_spec(project: Project) -> tuple[Path | None, str]:
    """The conda.yaml path and text; no file means MLflow's bare ``python`` env."""
    if project.env_type is EnvType.DOCKER:
        raise EnvironmentBuildError("A docker_env project has no conda environment to build.")
    path = project.env_config_path
    if path is None:
        return None, ""
    if project.env_type is not EnvType.CONDA:
        raise EnvironmentBuildError(
            "python_env project cannot be executed using conda. Set `--env-manager` to "
            "'virtualenv' or 'local' to execute this project."
        )
    try:
        text = await anyio.Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise EnvironmentBuildError(
            f"Cannot read conda environment file {path}: {exc.strerror or exc}"
        ) from exc
    return path, text


# --- single flight -----------------------------------------------------------------


@dataclass
class _Flight:
    """Callers in this process preparing one environment: they queue on ``lock``; the
    first to succeed leaves the prefix for the others, so N callers list conda's
    environments once rather than N times. Nothing is kept once all have left."""

    lock: anyio.Lock = field(default_factory=anyio.Lock)
    users: int = 0
    done: bool = False
    prefix: Path | None = None


async def _ensure_once(creator: _Creator) -> Path | None:
    """``creator.ensure()`` single-flight in the process and under ``flock`` on
    ``<record>.lock`` across processes (see :func:`aioproj.envs.cache._file_lock`).

    Waiting is cancellable and holds no thread; a failed attempt leaves the next waiter
    to try again.
    """
    key = f"{creator.record}\0{creator.tools.conda}"
    flight = _FLIGHTS.get(key)
    if flight is None:
        flight = _FLIGHTS[key] = _Flight()
    flight.users += 1
    try:
        async with flight.lock:
            if not flight.done:
                lock_file = creator.record.with_name(creator.record.name + ".lock")
                async with _file_lock(lock_file):
                    flight.prefix = await creator.ensure()
                flight.done = True
            return flight.prefix
    finally:
        flight.users -= 1
        if flight.users == 0:
            del _FLIGHTS[key]


# --- creating ------------------------------------------------------------------------


class _Creator:
    """Check-and-create for one environment; call :meth:`ensure` under the lock."""

    def __init__(
        self,
        tools: CondaTools,
        name: str,
        spec_path: Path | None,
        project_dir: Path,
        record: Path,
        on_output: OutputCallback | None,
    ) -> None:
        self.tools = tools
        self.name = name
        self.spec_path = spec_path
        self.project_dir = project_dir
        self.record = record
        self.on_output = on_output
        self.env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    async def ensure(self) -> Path | None:
        """The environment's prefix (None if conda does not list one), created if absent.

        Raises EnvironmentBuildError; see :func:`prepare_conda_env` for cancellation.
        """
        envs = await self.list_envs()
        if await anyio.Path(self.record / _BUILDING_FLAG).exists():
            logger.warning("Removing conda environment %s left half-made", self.name)
            if not await self.remove(envs):
                raise EnvironmentBuildError(
                    f"The conda environment {self.name} was left half-made by an interrupted "
                    f"creation and cannot be removed. Remove it with `{self.tools.conda} "
                    f"remove --yes --name {self.name} --all` and delete {self.record}."
                )
            envs.pop(self.name, None)
            await self._clear_flag()
        if self.name in envs:
            logger.debug("Conda environment %s already exists", self.name)
            return envs[self.name]
        return await self.create()

    async def create(self) -> Path | None:
        logger.info("=== Creating conda environment %s ===", self.name)
        await anyio.Path(self.record).mkdir(parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(_remove_marker, self.record)
        await anyio.Path(self.record / _BUILDING_FLAG).write_text(str(os.getpid()))
        try:
            await run_step(
                self.create_argv(),
                what=f"Creating conda environment {self.name}",
                hint=self.hint(),
                cwd=self.project_dir,
                env=self.env,
                on_output=self.on_output,
            )
            prefix = (await self.list_envs()).get(self.name)
        except BaseException:
            # Shielded and bounded: the half-made environment goes before the error or
            # the cancellation propagates; if it cannot, the flag stays for the next run.
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                if await self.remove(None):
                    await self._clear_flag()
            raise
        await anyio.to_thread.run_sync(_write_marker, self.record, self.info(prefix))
        await self._clear_flag()
        return prefix

    def create_argv(self) -> list[str]:
        """MLflow's command: ``env create -n <name> --file <yaml>``, or a bare python env."""
        if self.spec_path is None:
            return [
                self.tools.create,
                "create",
                "--channel=conda-forge",
                "--yes",
                "--override-channels",
                "-n",
                self.name,
                "python",
            ]
        return [self.tools.create, "env", "create", "-n", self.name, "--file", str(self.spec_path)]

    async def list_envs(self) -> dict[str, Path]:
        """``conda env list --json``: environment name (basename) → prefix.

        Raises EnvironmentBuildError if conda fails or prints something else than JSON.
        """
        argv = [self.tools.conda, "env", "list", "--json"]
        result = await anyio.run_process(argv, stdin=subprocess.DEVNULL, env=self.env, check=False)
        if result.returncode != 0:
            tail = OutputTail()
            tail.add(result.stdout + result.stderr)
            raise EnvironmentBuildError(
                f"Listing conda environments failed (exit code {result.returncode}) running: "
                f"{shlex.join(argv)}\n--- last output ---\n{tail.text()}\n---"
            )
        return _parse_env_list(result.stdout, argv)

    async def remove(self, envs: Mapping[str, Path] | None) -> bool:
        """``conda remove --yes --name <name> --all`` if conda lists the environment
        (``envs``, or listed now when None). True if it is gone; failures are logged."""
        try:
            if envs is None:
                envs = await self.list_envs()
            if self.name not in envs:
                return True
            logger.warning("Removing conda environment %s", self.name)
            await run_step(
                [self.tools.conda, "remove", "--yes", "--name", self.name, "--all"],
                what=f"Removing conda environment {self.name}",
                hint="Remove it by hand with `conda env remove -n <name>`.",
                cwd=self.project_dir,
                env=self.env,
                on_output=self.on_output,
            )
        except EnvironmentBuildError as exc:
            logger.warning("Removing conda environment %s failed: %s", self.name, exc)
            return False
        return True

    async def _clear_flag(self) -> None:
        await anyio.Path(self.record / _BUILDING_FLAG).unlink(missing_ok=True)

    def hint(self) -> str:
        source = self.spec_path or "the default python environment"
        return (
            f"Check the dependencies in {source} (conda channels and packages, and the "
            "'pip:' list, installed with the new environment's pip)."
        )

    def info(self, prefix: Path | None) -> dict[str, object]:
        return {
            "manager": "conda",
            "name": self.name,
            "prefix": str(prefix) if prefix is not None else None,
            "conda": self.tools.conda,
            "create_command": self.tools.create,
            "source": str(self.spec_path) if self.spec_path else None,
        }


def _parse_env_list(stdout: bytes, argv: list[str]) -> dict[str, Path]:
    try:
        data = json.loads(stdout.decode("utf-8", errors="replace"))
        prefixes = data.get("envs", []) if isinstance(data, dict) else []
        return {os.path.basename(str(p).rstrip("/")): Path(str(p)) for p in prefixes}
    except ValueError as exc:
        raise EnvironmentBuildError(
            f"{shlex.join(argv)} did not print JSON: {stdout[:500]!r}"
        ) from exc


def _remove_marker(record: Path) -> None:
    if is_complete(record):
        (record / MARKER_NAME).unlink()
