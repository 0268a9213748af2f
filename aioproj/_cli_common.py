"""What the commands of the ``aioproj`` CLI share: the options of ``mlflow run``, their
parsing and usage errors, and running a command until SIGTERM or SIGHUP.

:mod:`aioproj.cli` and :mod:`aioproj._cli_sweep` both build on this module; neither
imports the other's internals.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

__all__ = [
    "ENV_DEFAULTS",
    "UsageError",
    "add_project_options",
    "backend_config",
    "pairs",
    "until_terminated",
]


#: Options that fall back to an environment variable, as in ``mlflow run``.
ENV_DEFAULTS = {
    "experiment_name": "MLFLOW_EXPERIMENT_NAME",
    "experiment_id": "MLFLOW_EXPERIMENT_ID",
    "storage_dir": "MLFLOW_TMP_DIR",
}


class UsageError(Exception):
    """A command-line mistake: reported with the usage line, exit code 2."""


def add_project_options(
    parser: argparse.ArgumentParser,
    param_help: str = "A parameter of the entry point; repeat for more.",
) -> None:
    """The options ``aioproj run`` and ``aioproj sweep`` share (those of ``mlflow run``)."""
    parser.add_argument("uri", metavar="URI")
    parser.add_argument("-e", "--entry-point", default="main", metavar="NAME")
    parser.add_argument(
        "-v",
        "--version",
        dest="project_version",
        metavar="VERSION",
        help="Git commit, branch or tag to run.",
    )
    parser.add_argument(
        "-P",
        "--param-list",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=param_help,
    )
    parser.add_argument(
        "-A",
        "--docker-args",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="An argument for `docker run` (a bare NAME is a flag); repeat for more.",
    )
    parser.add_argument(
        "--experiment-name",
        help="Experiment to run in, created if missing [env MLFLOW_EXPERIMENT_NAME].",
    )
    parser.add_argument(
        "--experiment-id", help="Experiment id to run in [env MLFLOW_EXPERIMENT_ID]."
    )
    parser.add_argument(
        "-b",
        "--backend",
        default="local",
        metavar="BACKEND",
        help="local (default), databricks, kubernetes, slurm, or a plugin backend.",
    )
    parser.add_argument(
        "-c",
        "--backend-config",
        metavar="FILE_OR_JSON",
        help="A .json file or a JSON string of backend options.",
    )
    parser.add_argument(
        "--env-manager",
        choices=("local", "virtualenv", "uv", "conda"),
        help="How to build the project's environment (default: from the project).",
    )
    parser.add_argument(
        "--storage-dir", help="Where to download `path` parameters [env MLFLOW_TMP_DIR]."
    )
    parser.add_argument(
        "--build-image",
        action="store_true",
        help="Build a docker image with the project code inside (docker projects).",
    )


def pairs(values: Sequence[str], *, option: str, flags: bool) -> dict[str, Any]:
    """``name=value`` options to a dict, with mlflow's usage errors."""
    result: dict[str, Any] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep and not flags:
            raise UsageError(
                f"Invalid format for {option} parameter: {item!r}. Use {option} name=value."
            )
        if not name:
            raise UsageError(f"Invalid format for {option} parameter: {item!r}: the name is empty.")
        if name in result:
            raise UsageError(f"Repeated parameter: {name!r}")
        result[name] = value if sep else True
    return result


def backend_config(value: str | None) -> dict[str, Any] | str | None:
    if value is None or value.endswith(".json"):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise UsageError(f"Invalid backend config JSON. Parse error: {exc}") from exc
    if not isinstance(parsed, dict):
        raise UsageError("Invalid backend config JSON: it must be a JSON object.")
    return parsed


async def until_terminated(
    body: Callable[[], Awaitable[tuple[str, bool]]],
) -> tuple[str, bool] | None:
    """Run ``body``; SIGTERM or SIGHUP cancel it (so runs are stopped and recorded KILLED,
    as Ctrl-C does) and then None is returned."""
    import signal

    import anyio

    result: tuple[str, bool] | None = None
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        async def main() -> None:
            nonlocal result, error
            try:
                result = await body()
            except Exception as exc:  # raised below as itself, not in a group
                error = exc
            finally:
                tg.cancel_scope.cancel()

        tg.start_soon(on_signal)
        tg.start_soon(main)
    if error is not None:
        raise error
    return result
