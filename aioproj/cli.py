"""The ``aioproj`` command: ``aioproj run`` mirrors ``mlflow run`` option for option;
``aioproj envs list|prune`` manages the cached environments.

A thin layer: it parses options the way ``mlflow run`` does (same flags, same environment
variables, same usage errors) and calls the async API with ``anyio.run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from aioproj._cli_common import (
    ENV_DEFAULTS,
    UsageError,
    add_project_options,
    backend_config,
    pairs,
    until_terminated,
)

if TYPE_CHECKING:
    from aioproj.envs.manage import EnvEntry

__all__ = ["main"]

_SYNC_BY_DEFAULT = ("local", "kubernetes", "slurm")
#: aioproj._detach.ARGV_FD_VAR, spelled out so that ``aioproj --help`` imports no more.
_ARGV_FD_VAR = "_AIOPROJ_DETACHED_ARGV_FD"


class _Parser(argparse.ArgumentParser):
    """argparse, with click's words for a missing argument, as ``mlflow run`` says it."""

    _REQUIRED = "the following arguments are required: "

    def error(self, message: str) -> NoReturn:
        if message.startswith(self._REQUIRED):
            first = message.removeprefix(self._REQUIRED).split(", ")[0]
            message = f"Missing argument '{first}'."
        super().error(message)


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="aioproj", description="Run MLflow Projects from asyncio.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"aioproj {__version__}")
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="Load environment variables from a dotenv file first (existing ones win).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser(
        "run",
        allow_abbrev=False,
        help="Run an MLflow project from a local path, a git URI or a zip archive.",
        description=(
            "Run an MLflow project from a URI (a local directory, a git repository, or a "
            "zip archive; add #subdir for a project inside it)."
        ),
    )
    add_project_options(run)
    run.add_argument("--run-id", help="Record into this existing run instead of a new one.")
    run.add_argument("--run-name", help="The name of the new run.")
    wait = run.add_mutually_exclusive_group()
    wait.add_argument(
        "--wait",
        dest="wait",
        action="store_true",
        default=None,
        help="Wait for the run to end (default for local, kubernetes and slurm).",
    )
    wait.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="Return once the run has started (default: databricks). A local run is "
        "then supervised by a detached aioproj process.",
    )
    _add_envs_parser(commands)
    _add_recover_parser(commands)
    from aioproj._cli_sweep import add_parsers

    add_parsers(commands)
    return parser


def _add_recover_parser(commands: Any) -> None:
    recover = commands.add_parser(
        "recover",
        allow_abbrev=False,
        help="Finish the runs a killed aioproj process left behind.",
        description=(
            "Every run aioproj starts is noted in a journal (<AIOPROJ_CACHE_DIR or "
            "~/.cache/aioproj>/journal) until its final status is recorded. For runs whose "
            "aioproj process died: local runs still running are stopped and recorded "
            "KILLED, those that ended unwatched FAILED; remote runs get the state their "
            "backend reports. Final statuses that tracking refused are written now. Each "
            "status written gets the tag aioproj.recovered saying why."
        ),
    )
    recover.add_argument(
        "--dry-run", action="store_true", help="Say what would be done; stop and write nothing."
    )
    recover.add_argument(
        "--grace-period", type=float, default=10.0, metavar="SECONDS",
        help="Seconds between SIGTERM and SIGKILL for leftover processes (default 10).",
    )  # fmt: skip


def _recover_command(args: argparse.Namespace) -> int:
    import anyio

    from aioproj.journal import recover

    results = anyio.run(lambda: recover(grace_period=args.grace_period, dry_run=args.dry_run))
    for result in results:
        status = result.status or "-"
        print(f"{result.run_id}  {result.backend:<10}  {status:<8}  {result.action}")
    if not results:
        print("No runs to recover.")
    return 0


def _add_envs_parser(commands: Any) -> None:
    envs = commands.add_parser(
        "envs",
        allow_abbrev=False,
        help="List or prune the cached project environments.",
        description=(
            "virtualenv and uv environments live in $MLFLOW_ENV_ROOT when it is set, else "
            "in <AIOPROJ_CACHE_DIR or ~/.cache/aioproj>/envs (with conda's record "
            "directories); both are scanned."
        ),
    )
    actions = envs.add_subparsers(dest="envs_command", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser(
        "list",
        allow_abbrev=False,
        help="One line per environment: manager, status, size, last used, created, "
        "python, directory.",
    )
    listing.add_argument("--json", action="store_true", help="Print a JSON array instead.")
    prune = actions.add_parser(
        "prune",
        allow_abbrev=False,
        help="Remove broken environments, and old (--older-than) or all (--all) ones.",
        description=(
            "Removes virtualenv/uv environment directories and their lock files: broken "
            "ones (a crashed build) always, plus those unused for --older-than DAYS, or "
            "all with --all. An environment whose build is in progress is skipped. Conda "
            "environments are not removed: the conda command that removes them is printed."
        ),
    )
    prune.add_argument("--older-than", type=float, metavar="DAYS", default=None)
    prune.add_argument("--all", dest="remove_all", action="store_true")
    prune.add_argument(
        "--dry-run", action="store_true", help="Say what would be removed; remove nothing."
    )


def _envs_command(args: argparse.Namespace) -> int:
    import anyio

    from aioproj.envs import manage

    if args.envs_command == "list":
        entries = anyio.run(manage.list_envs)
        if args.json:
            print(json.dumps([_entry_json(e) for e in entries], indent=2))
        else:
            _print_envs(entries)
        return 0
    if args.older_than is not None and args.older_than < 0:
        raise UsageError("--older-than must be a number of days >= 0.")
    if args.remove_all and args.older_than is not None:
        raise UsageError("Specify only one of --all or --older-than.")

    async def prune() -> list[manage.PruneOutcome]:
        return await manage.prune_envs(
            older_than_days=args.older_than, remove_all=args.remove_all, dry_run=args.dry_run
        )

    outcomes = anyio.run(prune)
    freed = 0
    for outcome in outcomes:
        entry = outcome.entry
        if outcome.action in ("removed", "would remove"):
            freed += entry.size
        note = f" ({outcome.note})" if outcome.note else ""
        print(f"{outcome.action}: {entry.manager} {entry.status} {entry.directory}{note}")
    verb = "would free" if args.dry_run else "freed"
    print(f"{len(outcomes)} selected, {verb} {_human_size(freed)}", file=sys.stderr)
    return 1 if any(o.action == "failed" for o in outcomes) else 0


def _entry_json(entry: EnvEntry) -> dict[str, Any]:
    return {
        "manager": entry.manager,
        "directory": str(entry.directory),
        "status": entry.status,
        "size": entry.size,
        "created": entry.created,
        "last_used": entry.last_used,
        "python_version": entry.python_version,
        "conda_name": entry.conda_name,
        "conda_prefix": entry.conda_prefix,
    }


def _print_envs(entries: Sequence[EnvEntry]) -> None:
    import time

    def when(stamp: float | None) -> str:
        return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))

    rows = [("MANAGER", "STATUS", "SIZE", "LAST USED", "CREATED", "PYTHON", "DIRECTORY")]
    for e in entries:
        directory = str(e.directory)
        if e.conda_name:
            directory += f" (conda env {e.conda_name})"
        rows.append(
            (
                e.manager,
                e.status,
                _human_size(e.size),
                when(e.last_used),
                when(e.created),
                e.python_version or "-",
                directory,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:6], widths, strict=True))
            + "  "
            + row[6]
        )


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"


def _load_env_file(path: str) -> None:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"Could not read --env-file {path}: {exc.strerror or exc}") from exc
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{path}:{number}: expected NAME=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        os.environ.setdefault(key.strip(), value)


def _run_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    # Environment defaults are read here, after --env-file has been loaded.
    for option, var in ENV_DEFAULTS.items():
        if getattr(args, option) is None and os.environ.get(var):
            setattr(args, option, os.environ[var])
    if args.experiment_name is not None and args.experiment_id is not None:
        raise UsageError("Specify only one of 'experiment-name' or 'experiment-id' options.")
    parameters = pairs(args.param_list, option="-P", flags=False)
    docker_args = pairs(args.docker_args, option="-A", flags=True)
    config = backend_config(args.backend_config)
    if args.backend == "kubernetes" and config is None:
        raise UsageError("Specify 'backend_config' when using kubernetes mode.")
    synchronous = args.wait if args.wait is not None else args.backend in _SYNC_BY_DEFAULT
    from aioproj._detach import REPORT_FD_VAR

    report_fd = os.environ.pop(REPORT_FD_VAR, None)
    if not synchronous and args.backend == "local" and report_fd is None:
        return _detach(argv)

    import anyio

    from aioproj import AioprojError, Runner
    from aioproj._browse import FULL_ID_LENGTH, find_run

    report = _Report(int(report_fd)) if report_fd is not None else None

    async def run_it() -> tuple[str, bool]:
        run_id = args.run_id
        if run_id is not None and len(run_id) < FULL_ID_LENGTH:  # a short id: find the run
            from aioproj.tracking.resolve import resolve_tracking_uri

            run_id = await find_run(resolve_tracking_uri(None), run_id)
        async with Runner(echo="off" if report else "plain") as runner:
            handle = await runner.run(
                args.uri,
                entry_point=args.entry_point,
                version=args.project_version,
                parameters=parameters,
                docker_args=docker_args,
                experiment_name=args.experiment_name,
                experiment_id=args.experiment_id,
                backend=args.backend,
                backend_config=config,
                storage_dir=args.storage_dir,
                synchronous=synchronous and report is None,
                run_id=run_id,
                run_name=args.run_name,
                env_manager=args.env_manager,
                build_image=args.build_image,
            )
            if report is not None:  # detached: say the run started, then supervise it
                report.send("ok", handle.run_id)
                return handle.run_id, await handle.wait()
            return handle.run_id, True

    try:
        outcome = anyio.run(until_terminated, run_it)
    except AioprojError as exc:
        if report is not None:
            report.send("error", str(exc))
        print(f"=== {exc} ===", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("=== Interrupted: the run was cancelled and recorded KILLED ===", file=sys.stderr)
        return 130
    if outcome is None:
        print("=== Terminated: the run was cancelled and recorded KILLED ===", file=sys.stderr)
        return 143
    run_id, ok = outcome
    if not ok:
        return 1
    print(
        f"=== Run (ID '{run_id}') {'succeeded' if synchronous else 'submitted'} ===",
        file=sys.stderr,
    )
    return 0


class _Report:
    """The detached supervisor's one message to the command that started it."""

    def __init__(self, fd: int) -> None:
        os.set_inheritable(fd, False)  # runs started here must not hold the pipe open
        self._fd: int | None = fd

    def send(self, kind: str, text: str) -> None:
        if self._fd is None:
            return
        with os.fdopen(self._fd, "w") as pipe:
            pipe.write(f"{kind} {text}")
        self._fd = None


def _detach(argv: Sequence[str]) -> int:
    """``--no-wait`` on the local backend: a detached aioproj process supervises the run.

    The run must outlive this command, so a new ``aioproj run --wait`` process in its own
    session starts it, reports the run id (or the error), then waits for the run and
    records its final status, as MLflow's asynchronous local runs do.
    """
    from aioproj._detach import SupervisorError, spawn_supervisor

    child_argv = ["--wait" if arg == "--no-wait" else arg for arg in argv]
    try:
        pid, run_id = spawn_supervisor(child_argv, os.environ)
    except SupervisorError as exc:
        if exc.usage:
            raise UsageError(str(exc)) from None
        print(f"=== {exc} ===", file=sys.stderr)
        return 1
    print(
        f"=== Run (ID '{run_id}') submitted; aioproj process {pid} supervises it ===",
        file=sys.stderr,
    )
    print(run_id)
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``aioproj`` command."""
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv_fd = os.environ.pop(_ARGV_FD_VAR, None)
    if argv_fd is not None:  # a detached supervisor: its arguments come on a pipe
        from aioproj._detach import read_argv

        try:
            argv = read_argv(int(argv_fd))
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read the arguments of a detached run: {exc}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # As `mlflow run`, say which command a local run runs, before it starts, and what an
    # environment build is doing while it builds.
    logging.getLogger("aioproj.backends.local").setLevel(logging.INFO)
    logging.getLogger("aioproj.envs").setLevel(logging.INFO)
    try:
        if args.env_file:
            _load_env_file(args.env_file)
        if args.command == "envs":
            code = _envs_command(args)
        elif args.command == "recover":
            code = _recover_command(args)
        elif args.command == "run":
            code = _run_command(args, argv)
        else:  # sweep, runs, logs
            from aioproj._cli_sweep import run_command

            code = run_command(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"aioproj: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
