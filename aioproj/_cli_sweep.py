"""``aioproj sweep``, ``aioproj report``, ``aioproj runs`` and ``aioproj logs``: the parts
of the CLI that run and show many runs.

``-P`` takes a comma-separated list of values per parameter (``-P alpha=0.1,0.5,0.9``):
without ``--samples`` the sweep runs every combination, with ``--samples N`` it draws N
random sets from them; with ``--samples`` a value may also be a range:
``uniform:LOW:HIGH``, ``loguniform:LOW:HIGH`` or ``int:LOW:HIGH``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aioproj._cli_common import (
    ENV_DEFAULTS,
    UsageError,
    add_project_options,
    backend_config,
    pairs,
    until_terminated,
)

if TYPE_CHECKING:
    from aioproj._browse import RunRow
    from aioproj.sweeps import Stopper, Sweep

__all__ = ["add_parsers", "parse_axis", "run_command"]

_SWEEP_PARAM_HELP = (
    "NAME=V1,V2,...: the values of a parameter to sweep (one value holds it fixed); "
    "with --samples also uniform:LOW:HIGH, loguniform:LOW:HIGH or int:LOW:HIGH. Repeat "
    "for more parameters."
)


def add_parsers(commands: Any) -> None:
    """Add the ``sweep``, ``runs`` and ``logs`` subcommands."""
    sweep = commands.add_parser(
        "sweep",
        allow_abbrev=False,
        help="Run a project once per parameter set, many at once, with a live view.",
        description=(
            "Run an MLflow project for every combination of the -P values (or --samples "
            "random ones), at most --max-parallel at once, each trial a child run of one "
            "parent run. A live table is shown when stdout is a terminal, one line per "
            "change otherwise, and a summary at the end. Ctrl-C stops every trial and "
            "records it KILLED. Exit code: 0 if no trial failed, 1 otherwise, 130 on "
            "Ctrl-C, 143 on SIGTERM."
        ),
    )
    add_project_options(sweep, _SWEEP_PARAM_HELP)
    sweep.add_argument("--run-name", help="The name of the sweep's parent run.")
    sweep.add_argument(
        "--max-parallel", type=int, default=4, metavar="N", help="Trials at once (default 4)."
    )
    sweep.add_argument(
        "--samples", type=int, metavar="N", help="Draw N random parameter sets instead."
    )
    sweep.add_argument("--seed", type=int, metavar="S", help="Seed of --samples.")
    sweep.add_argument("--metric", metavar="NAME", help="Rank trials by this logged metric.")
    sweep.add_argument("--goal", choices=("min", "max"), default="min", help="Default: min.")
    sweep.add_argument(
        "--fail-fast", action="store_true", help="Stop everything at the first failed trial."
    )
    sweep.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="Retries of a trial after an infrastructure failure (default 2); a project "
        "that exits non-zero is not retried.",
    )
    sweep.add_argument(
        "--early-stop",
        nargs="?",
        const="median",
        choices=("median", "asha"),
        help="Stop trials whose --metric falls behind (recorded KILLED, tagged "
        "aioproj.sweep.pruned): 'median' (the default) when worse than the median of "
        "finished trials at the same step; 'asha' by asynchronous successive halving.",
    )
    stopping = sweep.add_argument_group("early stopping")
    stopping.add_argument(
        "--warmup-steps",
        type=int,
        default=5,
        metavar="N",
        help="median: judge no value logged before step N (default 5).",
    )
    stopping.add_argument(
        "--min-trials",
        type=int,
        default=3,
        metavar="N",
        help="median: judge only once N finished trials logged later steps (default 3).",
    )
    stopping.add_argument(
        "--max-t",
        type=int,
        default=100,
        metavar="STEPS",
        help="asha: the last step trials reach; rungs lie below it (default 100).",
    )
    stopping.add_argument(
        "--grace-period",
        type=int,
        default=1,
        metavar="STEPS",
        help="asha: the step of the first rung (default 1).",
    )
    stopping.add_argument(
        "--reduction-factor",
        type=float,
        default=4,
        metavar="F",
        help="asha: rungs F times apart; the best 1/F at a rung go on (default 4).",
    )
    sweep.add_argument(
        "--resume",
        metavar="PARENT_RUN_ID",
        help="Continue that sweep (run the same command with this option): keep its "
        "finished trials, run the failed, killed and missing ones as new child runs of "
        "the same parent.",
    )
    sweep.add_argument(
        "--report", metavar="PATH", help="Write the sweep's HTML report there at the end."
    )
    sweep.add_argument(
        "--progress",
        choices=("auto", "live", "lines"),
        default="auto",
        help="live table, plain lines, or auto: live on a terminal (default).",
    )
    sweep.add_argument(
        "--echo", action="store_true", help="Also print the trials' output, labelled."
    )

    report = commands.add_parser(
        "report",
        allow_abbrev=False,
        help="Write the HTML report of a sweep.",
        description=(
            "Write one self-contained HTML file (no network needed to view it) with the "
            "metric against step for every trial, the parameters against the metric and "
            "the best trial of the sweep whose parent run is PARENT_RUN_ID."
        ),
    )
    report.add_argument("parent_run_id", metavar="PARENT_RUN_ID")
    report.add_argument(
        "-o", "--output", metavar="PATH", help="Default: sweep-<first 8 of the id>.html."
    )
    report.add_argument("--metric", metavar="NAME", help="Default: the sweep's metric.")
    report.add_argument("--tracking-uri", help="Default: MLFLOW_TRACKING_URI, else MLflow's.")

    runs = commands.add_parser(
        "runs",
        allow_abbrev=False,
        help="List the runs in the tracking store, newest first.",
        description="List runs of one experiment (or all) in MLFLOW_TRACKING_URI's store.",
    )
    experiment = runs.add_mutually_exclusive_group()
    experiment.add_argument("--experiment-name")
    experiment.add_argument("--experiment-id")
    runs.add_argument("--tracking-uri", help="Default: MLFLOW_TRACKING_URI, else MLflow's.")
    runs.add_argument("--limit", type=int, default=50, metavar="N", help="Default 50; 0: all.")
    runs.add_argument("--json", action="store_true", help="Print a JSON array instead.")

    logs = commands.add_parser(
        "logs",
        allow_abbrev=False,
        help="Print the saved output of a run.",
        description="Print a run's output as aioproj saved it (artifact aioproj/output.log).",
    )
    logs.add_argument("run_id", metavar="RUN_ID")
    logs.add_argument("--tracking-uri", help="Default: MLFLOW_TRACKING_URI, else MLflow's.")


def run_command(args: argparse.Namespace) -> int:
    """Run ``sweep``, ``runs`` or ``logs``; the exit code."""
    if args.command == "runs":
        return _runs(args)
    if args.command == "logs":
        return _logs(args)
    if args.command == "report":
        return _report(args)
    return _sweep(args)


def _usage(message: str) -> Exception:
    return UsageError(message)


_RANGES = {"uniform": "Uniform", "loguniform": "LogUniform", "int": "IntUniform"}


def parse_axis(name: str, text: str, *, sampled: bool) -> Any:
    """The values of ``-P name=text``: a list of strings, or a distribution.

    Raises UsageError for an empty value or a malformed range.
    """
    kind, sep, rest = text.partition(":")
    if sep and kind in _RANGES:
        import aioproj.sweeps as sweeps

        low, sep2, high = rest.partition(":")
        number = int if kind == "int" else float
        try:
            bounds = (number(low), number(high))
        except ValueError:
            bounds = None
        if not sep2 or bounds is None:
            raise _usage(f"-P {name}={text}: write {kind}:LOW:HIGH with two numbers.")
        if not sampled:
            raise _usage(f"-P {name}={text}: a range needs --samples N.")
        try:
            return getattr(sweeps, _RANGES[kind])(*bounds)
        except ValueError as exc:
            raise _usage(f"-P {name}={text}: {exc}") from exc
    values = text.split(",")
    if any(not v for v in values):
        raise _usage(f"-P {name}={text}: empty value; write -P {name}=V1,V2,...")
    return values if len(values) > 1 else values[0]


def _sweep(args: argparse.Namespace) -> int:
    for option, var in ENV_DEFAULTS.items():
        if getattr(args, option) is None and os.environ.get(var):
            setattr(args, option, os.environ[var])
    if args.experiment_name is not None and args.experiment_id is not None:
        raise _usage("Specify only one of 'experiment-name' or 'experiment-id' options.")
    if args.max_parallel < 1:
        raise _usage("--max-parallel must be at least 1.")
    if args.samples is not None and args.samples < 1:
        raise _usage("--samples must be at least 1.")
    if args.retries < 0:
        raise _usage("--retries must be 0 or more.")
    if args.early_stop and args.metric is None:
        raise _usage("--early-stop needs --metric NAME.")
    if args.report is not None and not args.report:
        raise _usage("--report needs a file path.")
    sampled = args.samples is not None
    raw = pairs(args.param_list, option="-P", flags=False)
    if not raw:
        raise _usage("Give the parameters to sweep: -P NAME=V1,V2,...")
    grid = {name: parse_axis(name, text, sampled=sampled) for name, text in raw.items()}
    docker_args = pairs(args.docker_args, option="-A", flags=True)
    config = backend_config(args.backend_config)
    if args.backend == "kubernetes" and config is None:
        raise _usage("Specify 'backend_config' when using kubernetes mode.")

    import anyio

    import aioproj
    from aioproj.sweeps import sweep

    try:
        the_sweep = sweep(
            args.uri,
            grid,
            samples=args.samples,
            seed=args.seed,
            max_parallel=args.max_parallel,
            fail_fast=args.fail_fast,
            retries=args.retries,
            metric=args.metric,
            goal=args.goal,
            early_stopping=_stopper(args),
            resume=_resume_id(args.resume),
            echo="labelled" if args.echo else "off",
            name=args.run_name,
            progress=args.progress,
            entry_point=args.entry_point,
            version=args.project_version,
            docker_args=docker_args,
            experiment_name=args.experiment_name,
            experiment_id=args.experiment_id,
            backend=args.backend,
            backend_config=config,
            storage_dir=args.storage_dir,
            env_manager=args.env_manager,
            build_image=args.build_image,
        )
    except aioproj.InvalidArgumentError as exc:
        raise _usage(str(exc)) from exc

    async def body() -> tuple[str, bool]:
        async with the_sweep:
            async for _ in the_sweep:
                pass
        if args.report and the_sweep.parent_run_id is not None:
            try:
                await the_sweep.write_report(args.report)
                print(f"Report: {args.report}", file=sys.stderr)
            except (aioproj.AioprojError, OSError) as exc:
                print(f"aioproj: could not write the report {args.report}: {exc}", file=sys.stderr)
                return the_sweep.parent_run_id, False
        return the_sweep.parent_run_id or "", _succeeded(the_sweep)

    try:
        outcome = anyio.run(until_terminated, body)
    except aioproj.AioprojError as exc:
        print(f"=== {exc} ===", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("=== Interrupted: every trial was cancelled and recorded KILLED ===", file=sys.stderr)
        return 130
    if outcome is None:
        print("=== Terminated: every trial was cancelled and recorded KILLED ===", file=sys.stderr)
        return 143
    parent, ok = outcome
    verdict = "succeeded" if ok else "had failures"
    if not the_sweep.parent_recorded:
        print(
            f"=== Sweep (parent run ID '{parent}') {verdict}, but its parent run's final"
            " status could not be recorded; it is kept in the run journal: run `aioproj"
            " recover` once the tracking store is reachable ===",
            file=sys.stderr,
        )
        return 1
    print(f"=== Sweep (parent run ID '{parent}') {verdict} ===", file=sys.stderr)
    return 0 if ok else 1


def _resume_id(text: str | None) -> str | None:
    """The sweep ``--resume`` names: a short id resolved in the tracking store.

    Raises:
        UsageError: no run or several runs have that short id (the message lists them).
    """
    import anyio

    from aioproj._browse import FULL_ID_LENGTH, find_run
    from aioproj.errors import TrackingError

    if text is None or len(text) >= FULL_ID_LENGTH:
        return text
    try:
        return anyio.run(find_run, _tracking_uri(None), text)
    except TrackingError as exc:
        raise _usage(str(exc)) from exc


def _stopper(args: argparse.Namespace) -> Stopper | None:
    """The early stopping the options ask for; UsageError for bad settings."""
    from aioproj import ASHA, InvalidArgumentError, MedianStopping

    try:
        if args.early_stop == "median":
            return MedianStopping(
                args.metric, args.goal, warmup_steps=args.warmup_steps, min_trials=args.min_trials
            )
        if args.early_stop == "asha":
            return ASHA(
                args.metric,
                args.goal,
                max_t=args.max_t,
                grace_period=args.grace_period,
                reduction_factor=args.reduction_factor,
            )
    except InvalidArgumentError as exc:
        raise _usage(f"--early-stop {args.early_stop}: {exc}") from exc
    return None


def _report(args: argparse.Namespace) -> int:
    import anyio

    from aioproj import AioprojError
    from aioproj._browse import find_run
    from aioproj.sweeps.report import write_sweep_report

    uri = _tracking_uri(args.tracking_uri)
    path = args.output

    async def write() -> None:
        nonlocal path
        parent_run_id = await find_run(uri, args.parent_run_id)
        path = path or f"sweep-{parent_run_id[:8]}.html"
        await write_sweep_report(uri, parent_run_id, path, metric=args.metric)

    try:
        anyio.run(write)
    except (AioprojError, OSError) as exc:
        print(f"aioproj: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _succeeded(sweep: Sweep) -> bool:
    from aioproj import RunStatus

    if sweep.status is not RunStatus.FINISHED:
        return False
    return all(r.ok or r.pruned for r in sweep.results)


def _tracking_uri(value: str | None) -> str:
    from aioproj.tracking.resolve import resolve_tracking_uri

    return resolve_tracking_uri(value)


def _runs(args: argparse.Namespace) -> int:
    import anyio

    from aioproj import AioprojError
    from aioproj._browse import list_runs, short_ids

    if args.limit < 0:
        raise _usage("--limit must be 0 or more.")
    uri = _tracking_uri(args.tracking_uri)
    filtered = args.experiment_name is not None or args.experiment_id is not None

    async def listing() -> tuple[list[RunRow], list[RunRow]]:
        rows = await list_runs(
            uri, experiment_name=args.experiment_name, experiment_id=args.experiment_id
        )
        # short ids are unique across the whole store, so `aioproj logs` finds each
        return rows, (await list_runs(uri) if filtered else rows)

    try:
        rows, every = anyio.run(listing)
    except AioprojError as exc:
        print(f"aioproj: {exc}", file=sys.stderr)
        return 1
    if args.limit:
        rows = rows[: args.limit]
    short = short_ids(row.run_id for row in every)
    if args.json:
        print(
            json.dumps([{**row.__dict__, "short_id": short[row.run_id]} for row in rows], indent=2)
        )
    else:
        _print_runs(rows, short)
    return 0


def _print_runs(rows: Sequence[RunRow], short: Mapping[str, str]) -> None:
    def when(ms: int) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

    def took(row: RunRow) -> str:
        if not row.end_time_ms or not row.start_time_ms:
            return "-"
        return f"{(row.end_time_ms - row.start_time_ms) / 1000:.1f}s"

    def shown(run_id: str | None) -> str:
        return "-" if run_id is None else short.get(run_id, run_id[:8])

    table = [("RUN ID", "STATUS", "STARTED", "TIME", "EXPERIMENT", "PARENT", "ENTRY", "NAME")]
    for row in rows:
        table.append(
            (
                shown(row.run_id),
                row.status,
                when(row.start_time_ms),
                took(row),
                row.experiment_name or row.experiment_id,
                shown(row.parent_run_id),
                row.entry_point or "-",
                row.run_name,
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def _logs(args: argparse.Namespace) -> int:
    import anyio

    from aioproj import AioprojError

    uri = _tracking_uri(args.tracking_uri)

    try:
        data = anyio.run(_saved_output, uri, args.run_id)
    except AioprojError as exc:
        print(f"aioproj: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


async def _saved_output(uri: str, text: str) -> bytes:
    """The saved output of the run ``text`` names (a full or short id).

    Raises TrackingError: no such run, an ambiguous short id, or no saved output (for a
    sweep's parent run, the message lists its trials)."""
    from aioproj._browse import find_run, read_output, short_ids, sweep_trials
    from aioproj.errors import TrackingError

    run_id = await find_run(uri, text)
    try:
        return await read_output(uri, run_id)
    except TrackingError:
        trials = await sweep_trials(uri, run_id)
        if not trials:
            raise
    short = short_ids(row.run_id for row in trials)
    listed = "\n".join(
        f"  {short[row.run_id]}  {row.status:<9} {row.run_name}".rstrip() for row in trials
    )
    raise TrackingError(
        f"Run '{run_id}' is the parent run of a sweep: it has no output of its own. Its "
        f"{len(trials)} trials (aioproj logs <id> prints one's output):\n{listed}"
    )
