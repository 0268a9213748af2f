"""The ``docker`` environment: ``docker_env`` projects run with ``docker run`` (docker CLI).

Preparation (before any run is tracked) checks what MLflow checks: the project has a name
(it tags built images), ``docker`` is on PATH and ``docker info`` succeeds. Then either

* ``build_image=False`` (the default): the base image is used as it is, pulled if it is
  not present (after ``docker login`` when ``docker_auth`` is given). Unlike MLflow
  (#8077), the project directory is mounted at ``/mlflow/projects/code`` and made the
  working directory, so the entry point finds its files;
* ``build_image=True``: an image ``<project name>:<git sha[:7] or "latest">`` is built from
  a generated Dockerfile (``FROM <image>``, ``COPY . /mlflow/projects/code/``,
  ``WORKDIR /mlflow/projects/code/``) in a temporary copy of the project without
  ``mlruns``, removed afterwards.

Getting the image is single-flight: concurrent runs of one project (a sweep) share one
``docker info``, one pull and one build.

The run is ``docker run --rm [docker_args] --label aioproj.run_id=<run id> [-v ...] [-w ...]
[-e NAME ...] <image> <command>`` through bash, the entry-point command appended as MLflow
appends it. No value is ever on a command line: the tracking variables go in as
``-e NAME`` (docker copies the value from its own environment), and the values that may be
secret (``docker_env.environment``, tracking credentials, a tracking URI that is not a
local store) do not go through docker's container configuration at all, where ``docker
inspect`` would show them: they are written to a file readable only through a private
directory, mounted at ``/run/aioproj/env`` and read by ``/bin/sh`` in the container before
it ``exec``s the image's entrypoint and the command (see :mod:`aioproj.envs.containers`).
A local tracking store is mounted at ``/mlflow/tmp/mlruns`` (and at its own path, so
artifact URIs recorded in it resolve) and ``MLFLOW_TRACKING_URI`` is rewritten for the
container.
"""

from __future__ import annotations

import logging
import os
import shlex
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from aioproj._redact import scrub
from aioproj._shared import SharedCalls
from aioproj.errors import EnvironmentBuildError
from aioproj.project import Project

from .base import PreparedEnv
from .containers import ENV_FILE_VAR, RUN_ID_LABEL, ContainerLaunch, env_file_text
from .docker_cli import (
    CODE_DIR,
    Image,
    OutputCallback,
    auth_key,
    build_image,
    docker_output,
    dockerfile_text,
    find_docker,
    inspect_image,
    login,
    registry_secrets,
    require_image,
    scrubbing,
)
from .steps import run_step

if TYPE_CHECKING:
    from aioproj.backends.base import Launch

__all__ = [
    "CODE_DIR",
    "CONTAINER_ENV_FILE",
    "CONTAINER_TRACKING_DIR",
    "ENV_FILE_VAR",
    "RUN_ID_LABEL",
    "DockerPreparedEnv",
    "container_env_names",
    "docker_args_argv",
    "docker_run_argv",
    "dockerfile_text",
    "env_file_text",
    "image_tag",
    "prepare_docker_env",
    "tracking_mount",
]

logger = logging.getLogger("aioproj.envs")

#: Where a local tracking store is mounted inside the container (MLflow's path).
CONTAINER_TRACKING_DIR = "/mlflow/tmp/mlruns"
#: Where the run's env file is mounted in the container.
CONTAINER_ENV_FILE = "/run/aioproj/env"
#: What the container runs first when it gets an env file: read it, become the command.
ENV_LOADER = f'. {CONTAINER_ENV_FILE} && exec "$@"'
#: The variables every run passes into its container (by name: values stay on the host).
TRACKING_ENV_NAMES = (
    "MLFLOW_RUN_ID",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_ALLOW_FILE_STORE",
)
#: Databricks credentials forwarded (by name) when runs are tracked in Databricks.
DATABRICKS_ENV_NAMES = (
    "DATABRICKS_HOST",
    "DATABRICKS_TOKEN",
    "DATABRICKS_USERNAME",
    "DATABRICKS_PASSWORD",
    "DATABRICKS_INSECURE",
    "DATABRICKS_CLIENT_ID",
    "DATABRICKS_CLIENT_SECRET",
)
#: Credentials of an MLflow tracking server, forwarded (by name) for http(s) URIs.
HTTP_TRACKING_ENV_NAMES = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)

_NO_NAME = "Project name in MLProject must be specified when using docker for image tagging."
#: Concurrent runs needing one image share one info/login/pull/build (see _get_image).
_IMAGES = SharedCalls()


class _Expanded(str):
    """An argument the run's shell expands: it names a variable set at start (the run id,
    the env file), so it is double-quoted rather than single-quoted in the command."""

    __slots__ = ()


@dataclass(frozen=True)
class DockerPreparedEnv(PreparedEnv):
    """A docker environment: :meth:`wrap` turns the entry point into ``docker run``.

    ``run_prefix`` is the shell text before the entry-point command: variable
    assignments that hold no secret (the container's tracking URI) and the quoted
    ``docker run`` argv, in which ``$MLFLOW_RUN_ID`` (the label) and
    ``$AIOPROJ_DOCKER_ENV_FILE`` (the env file's mount) are expanded by the run's shell.
    ``file_env_names`` are the variables that reach the container through the env file
    (empty: no env file, the image's own entrypoint runs); ``defined`` holds the values
    ``docker_env.environment`` sets.
    """

    run_prefix: str = ""
    image_uri: str = ""
    image_id: str = ""
    run_argv: tuple[str, ...] = field(default=())
    docker: str = "docker"
    file_env_names: tuple[str, ...] = ()
    defined: Mapping[str, str] = field(default_factory=dict, repr=False)

    def wrap(self, command: str) -> str:
        """``<prefix> <command>``: the command is appended as MLflow appends it, so the
        host shell splits it into the container's argv."""
        return f"{self.run_prefix} {command}"

    def wrap_launch(self, launch: Launch) -> Launch:
        """A launch that also writes the run's env file and stops, removes and finds
        again the run's container (see :mod:`aioproj.envs.containers`)."""
        return ContainerLaunch(
            launch, docker=self.docker, file_env_names=self.file_env_names, defined=self.defined
        )


# -- pure command building --------------------------------------------------------------


def docker_args_argv(docker_args: Mapping[str, str | bool]) -> list[str]:
    """``docker run`` options from ``docker_args`` as MLflow builds them.

    ``{"gpus": "all"}`` → ``--gpus all``; ``{"privileged": True}`` → ``--privileged``;
    one-character names take one dash (``{"t": True}`` → ``-t``). A value of ``False``
    leaves the flag out (MLflow would pass the string ``False``). Raises nothing.
    """
    argv: list[str] = []
    for name, value in docker_args.items():
        option = f"-{name}" if len(name) == 1 else f"--{name}"
        if value is True:
            argv.append(option)
        elif value is False:
            continue
        else:
            argv += [option, str(value)]
    return argv


def tracking_mount(tracking_uri: str) -> tuple[str, str] | None:
    """``(host path, container URI)`` when ``tracking_uri`` is a local store, else None.

    A path, ``file:`` or ``sqlite:`` URI without a host is mounted at
    :data:`CONTAINER_TRACKING_DIR`, and the container logs to ``file:///mlflow/tmp/mlruns``
    (``sqlite:////mlflow/tmp/mlruns``), as MLflow does. Raises nothing. A relative path
    is made absolute against the working directory (blocking: call it in a thread).
    """
    if not tracking_uri or tracking_uri.startswith("databricks"):
        return None
    parsed = urllib.parse.urlparse(tracking_uri)
    scheme = parsed.scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter
        scheme = ""
    if parsed.netloc or scheme not in ("", "file", "sqlite"):
        return None
    if scheme == "sqlite":  # SQLAlchemy: sqlite:///relative.db, sqlite:////absolute.db
        path = os.path.abspath(urllib.request.url2pathname(parsed.path[1:]))
        return path, f"sqlite:///{CONTAINER_TRACKING_DIR}"  # four slashes: an absolute path
    path = os.path.abspath(urllib.request.url2pathname(parsed.path))
    return path, f"file://{CONTAINER_TRACKING_DIR}"


def expand_volume(volume: str) -> str:
    """A ``docker_env`` volume with ``$VARS`` and ``~`` expanded on its host side, as the
    shell MLflow runs ``docker run`` through does (aioproj quotes every argument)."""
    host, sep, rest = volume.partition(":")
    return os.path.expanduser(os.path.expandvars(host)) + sep + rest


def container_env_names(
    docker_env_items: Sequence[str | tuple[str, str]], tracking_uri: str
) -> list[str]:
    """The names passed with ``-e``, in order, without duplicates: the tracking variables,
    the store's credentials (Databricks, tracking server), then ``docker_env.environment``.
    Raises nothing."""
    names = list(TRACKING_ENV_NAMES)
    if tracking_uri.startswith("databricks"):
        names += DATABRICKS_ENV_NAMES
    elif urllib.parse.urlparse(tracking_uri).scheme.lower() in ("http", "https"):
        names += HTTP_TRACKING_ENV_NAMES
    for item in docker_env_items:
        names.append(item if isinstance(item, str) else item[0])
    return list(dict.fromkeys(names))


def docker_run_argv(
    docker: str,
    image: str,
    *,
    docker_args: Mapping[str, str | bool] = {},
    labels: Sequence[str] = (),
    mounts: Sequence[str] = (),
    workdir: str | None = None,
    env_names: Sequence[str] = (),
    entrypoint: Sequence[str] | None = None,
) -> list[str]:
    """``docker run --rm`` argv up to the command: docker_args, ``--label`` for each label,
    ``-v`` for each mount (in order), ``-w``, ``-e NAME`` for each name, then the image.

    With ``entrypoint`` (the env-file mode) the container starts ``/bin/sh``, which reads
    :data:`CONTAINER_ENV_FILE` and ``exec``s ``entrypoint`` followed by the command (the
    image's own entrypoint, or the ``entrypoint`` of ``docker_args``, which is then not
    passed as an option). Raises nothing.
    """
    args = dict(docker_args)
    if entrypoint is not None:
        args.pop("entrypoint", None)
    argv = [docker, "run", "--rm", *docker_args_argv(args)]
    for label in labels:
        argv += ["--label", label]
    for mount in mounts:
        argv += ["-v", mount]
    if workdir is not None:
        argv += ["-w", workdir]
    for name in env_names:
        argv += ["-e", name]
    if entrypoint is None:
        argv.append(image)
    else:
        argv += ["--entrypoint", "/bin/sh", image, "-c", ENV_LOADER, "aioproj-env", *entrypoint]
    return argv


def _shell_text(argv: Sequence[str]) -> str:
    return " ".join(f'"{a}"' if isinstance(a, _Expanded) else shlex.quote(a) for a in argv)


def image_tag(project_name: str, git_commit: str | None) -> str:
    """``<name>:<commit[:7]>``, or ``<name>:latest`` outside git. Raises nothing."""
    return f"{project_name}:{git_commit[:7] if git_commit else 'latest'}"


def missing_host_variables(
    items: Sequence[str | tuple[str, str]], environ: Mapping[str, str]
) -> list[str]:
    """The copied (bare-name) ``environment`` entries that ``environ`` lacks."""
    return [item for item in items if isinstance(item, str) and item not in environ]


# -- preparation ------------------------------------------------------------------------


async def prepare_docker_env(
    project: Project,
    *,
    project_dir: Path | None = None,
    docker_args: Mapping[str, str | bool] | None = None,
    build_image: bool = False,
    docker_auth: Mapping[str, str] | None = None,
    tracking_uri: str = "",
    git_commit: str | None = None,
    on_output: OutputCallback | None = None,
) -> DockerPreparedEnv:
    """Check docker, get or build the image, and say how runs start their container.

    ``project_dir`` defaults to ``project.directory``. ``docker_auth`` holds
    ``registry``, ``username`` and ``password`` (fed to ``docker login`` on stdin).

    Raises :class:`EnvironmentBuildError`: the project is not a docker project or has no
    name, docker is not on PATH, ``docker info``/``login``/``pull``/``build`` fails (with
    its output, secrets removed), or a host variable named in ``docker_env.environment``
    is not set. Cancellation kills the docker command in progress and removes the
    temporary build context before it propagates.
    """
    docker_env = project.docker_env
    if docker_env is None:
        raise EnvironmentBuildError(
            "The 'docker' environment manager runs only projects with a docker_env section. "
            "Run this project with env_manager='local' (the current environment) or "
            "'virtualenv'."
        )
    if not project.name:
        raise EnvironmentBuildError(_NO_NAME)
    missing = missing_host_variables(docker_env.environment, os.environ)
    if missing:
        raise EnvironmentBuildError(
            f"This project expects the {', '.join(missing)} environment variables to be set "
            f"on the machine running the project, but {missing[0]} was not set. Please "
            "ensure all expected environment variables are set."
        )
    directory = project_dir if project_dir is not None else project.directory
    docker = await find_docker()
    base = docker_env.image
    image_uri = image_tag(project.name, git_commit) if build_image else base
    key = "\0".join(
        [docker, base, image_uri, str(build_image), str(directory), auth_key(docker_auth)]
    )
    image = await _IMAGES.run(
        key,
        lambda: _get_image(
            docker,
            base,
            image_uri if build_image else None,
            directory,
            docker_auth,
            on_output,
        ),
    )
    args = dict(docker_args or {})
    _warn_unreachable_tracking(tracking_uri, args)
    # abspath may read the working directory: off the event loop
    local_store = await anyio.to_thread.run_sync(tracking_mount, tracking_uri)
    return _run_env(
        docker,
        image_uri,
        image,
        project_dir=directory,
        mount_code=not build_image,
        docker_args=args,
        volumes=docker_env.volumes,
        environment=docker_env.environment,
        tracking_uri=tracking_uri,
        local_store=local_store,
    )


async def _get_image(
    docker: str,
    base: str,
    build_tag: str | None,
    directory: Path,
    docker_auth: Mapping[str, str] | None,
    on_output: OutputCallback | None,
) -> Image:
    """``docker info``, login, pull the base if absent, build ``build_tag`` if given."""
    secrets = registry_secrets(docker_auth)
    code, output = await docker_output([docker, "info"], cwd=directory)
    if code != 0:
        raise EnvironmentBuildError(
            "Ran `docker info` to ensure docker daemon is running but it failed with the "
            f"following output:\n{scrub(output, secrets)}"
        )
    if docker_auth:
        await login(docker, docker_auth, cwd=directory)
    image = await inspect_image(docker, base, cwd=directory)
    if image is None:
        await run_step(
            [docker, "pull", base],
            what=f"Pulling the docker image {base}",
            hint="Check the image name, your network and registry credentials (docker_auth).",
            cwd=directory,
            env=os.environ,
            on_output=scrubbing(on_output, secrets),
        )
        image = await require_image(docker, base, cwd=directory)
    if build_tag is not None:
        await build_image(docker, base, build_tag, directory, on_output)
        image = await require_image(docker, build_tag, cwd=directory)
    return image


def _warn_unreachable_tracking(tracking_uri: str, docker_args: Mapping[str, str | bool]) -> None:
    """Warn when the container would log to itself: a tracking server on the host's
    loopback address is not reachable from a container on a bridge network."""
    parsed = urllib.parse.urlparse(tracking_uri)
    if parsed.scheme.lower() not in ("http", "https"):
        return
    host = (parsed.hostname or "").lower()
    if host != "localhost" and not host.startswith("127.") and host != "::1":
        return
    if str(docker_args.get("network", docker_args.get("net", ""))) == "host":
        return
    warnings.warn(
        f"The tracking URI {parsed.scheme}://{parsed.hostname}:{parsed.port or ''} is this "
        "machine's loopback address, which inside a container is the container itself: "
        "the run's own mlflow calls will not reach the server. Pass "
        "docker_args={'network': 'host'} (CLI: -A network=host), or use an address the "
        "container can reach (for example the docker bridge's gateway).",
        UserWarning,
        stacklevel=3,
    )


def _run_env(
    docker: str,
    image_uri: str,
    image: Image,
    *,
    project_dir: Path,
    mount_code: bool,
    docker_args: Mapping[str, str | bool],
    volumes: Sequence[str],
    environment: Sequence[str | tuple[str, str]],
    tracking_uri: str,
    local_store: tuple[str, str] | None,
) -> DockerPreparedEnv:
    mounts: list[str] = []
    if mount_code:
        mounts.append(f"{project_dir}:{CODE_DIR}")
    prefix = ""
    if local_store is not None:
        host, container_uri = local_store
        mounts.append(f"{host}:{CONTAINER_TRACKING_DIR}")
        if not tracking_uri.startswith("sqlite"):
            mounts.append(f"{host}:{host}")  # artifact URIs recorded in the store
        # The runner sets MLFLOW_TRACKING_URI for the docker CLI after our variables: set
        # the container's value on the command itself (it is a fixed path, not a secret).
        prefix = f"MLFLOW_TRACKING_URI={shlex.quote(container_uri)} "
    mounts += [expand_volume(volume) for volume in volumes]
    defined = {item[0]: item[1] for item in environment if not isinstance(item, str)}
    names = container_env_names(environment, tracking_uri)
    # Only values that cannot be secret go through docker's configuration (-e NAME):
    # the run id, the experiment and a local store's fixed container path.
    public = {"MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ALLOW_FILE_STORE"}
    if local_store is not None:
        public.add("MLFLOW_TRACKING_URI")
    file_names = tuple(n for n in names if n not in public)
    entrypoint: tuple[str, ...] | None = None
    if file_names:
        mounts.append(_Expanded(f"${ENV_FILE_VAR}:{CONTAINER_ENV_FILE}:ro"))
        override = docker_args.get("entrypoint")
        if isinstance(override, str):  # --entrypoint "" clears the image's
            entrypoint = (override,) if override else ()
        else:
            entrypoint = image.entrypoint
    argv = docker_run_argv(
        docker,
        image_uri,
        docker_args=docker_args,
        labels=[_Expanded(f"{RUN_ID_LABEL}=$MLFLOW_RUN_ID")],
        mounts=mounts,
        workdir=CODE_DIR if mount_code else None,
        env_names=[n for n in names if n in public],
        entrypoint=entrypoint,
    )
    return DockerPreparedEnv(
        manager="docker",
        tag="docker",
        tags={
            "mlflow.docker.image.uri": image_uri,
            "mlflow.docker.image.id": image.id,
        },
        run_prefix=prefix + _shell_text(argv),
        image_uri=image_uri,
        image_id=image.id,
        run_argv=tuple(argv),
        docker=docker,
        file_env_names=file_names,
        defined=defined,
    )
