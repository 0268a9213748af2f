"""MLflow's build-and-push mode (``build_image=True``) through the docker CLI: an image
``<repository-uri>[:<git sha[:7]>]`` with the project's code at /mlflow/projects/code,
pushed, and referenced by digest in the Job. Concurrent runs of one project (a sweep)
share one build and one push."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from aioproj._redact import scrub
from aioproj._shared import SharedCalls
from aioproj.envs.docker_cli import auth_key, build_image, docker_output, find_docker, login
from aioproj.envs.steps import run_step
from aioproj.errors import EnvironmentBuildError

__all__ = ["build_and_push", "image_uri"]

_BUILDS = SharedCalls()


def image_uri(repository_uri: str, git_commit: str | None) -> str:
    """MLflow's tag: the repository, plus ``:<commit[:7]>`` inside a git repo."""
    return f"{repository_uri}:{git_commit[:7]}" if git_commit else repository_uri


async def build_and_push(
    *,
    base_image: str,
    repository_uri: str,
    project_dir: Path,
    git_commit: str | None,
    docker_auth: Mapping[str, str] | None,
    on_output: Callable[[bytes], None] | None = None,
) -> tuple[str, str]:
    """Build the image, push it, return (tag, digest); concurrent calls for one project,
    base image, repository and credentials share one build and push (their output goes
    to the first caller's ``on_output``).

    Raises :class:`EnvironmentBuildError` with the docker output when docker is missing,
    its daemon is not running, or login, build, push or inspect fails. Cancellation kills
    the docker command in progress.
    """
    key = "\0".join(
        [
            base_image,
            image_uri(repository_uri, git_commit),
            str(project_dir),
            auth_key(docker_auth),
        ]
    )
    return await _BUILDS.run(
        key,
        lambda: _build_and_push(
            base_image=base_image,
            repository_uri=repository_uri,
            project_dir=project_dir,
            git_commit=git_commit,
            docker_auth=docker_auth,
            on_output=on_output,
        ),
    )


async def _build_and_push(
    *,
    base_image: str,
    repository_uri: str,
    project_dir: Path,
    git_commit: str | None,
    docker_auth: Mapping[str, str] | None,
    on_output: Callable[[bytes], None] | None,
) -> tuple[str, str]:
    docker = await find_docker()
    code, output = await docker_output([docker, "info"], cwd=project_dir)
    if code != 0:
        secrets = [docker_auth["password"]] if docker_auth and docker_auth.get("password") else []
        raise EnvironmentBuildError(
            "Ran `docker info` to ensure docker daemon is running but it failed with the "
            f"following output:\n{scrub(output, secrets)}"
        )
    if docker_auth:
        await login(docker, docker_auth, cwd=project_dir)
    tag = image_uri(repository_uri, git_commit)
    await build_image(docker, base_image, tag, project_dir, on_output)
    await run_step(
        [docker, "push", tag],
        what=f"Error while pushing to docker registry: pushing {tag}",
        hint="Check 'repository-uri' and that you are logged in to its registry (docker_auth).",
        cwd=project_dir,
        env=os.environ,
        on_output=on_output,
    )
    code, output = await docker_output(
        [docker, "image", "inspect", "--format", "{{json .RepoDigests}}", tag], cwd=project_dir
    )
    digest = _pick_digest(output, repository_uri) if code == 0 else None
    if digest is None:
        raise EnvironmentBuildError(
            f"Pushed {tag}, but `docker image inspect` shows no registry digest for it:\n"
            f"{output.strip()}"
        )
    return tag, digest


def _pick_digest(output: str, repository_uri: str) -> str | None:
    try:
        digests = json.loads(output.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    if not isinstance(digests, list):
        return None
    for item in digests:
        if isinstance(item, str) and "@" in item:
            name, digest = item.split("@", 1)
            if name == repository_uri:
                return digest
    for item in digests:
        if isinstance(item, str) and "@" in item:
            return item.split("@", 1)[1]
    return None
