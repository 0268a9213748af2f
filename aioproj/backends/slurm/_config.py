"""The Slurm backend's backend_config: checked, and turned into sbatch options. Pure, but
for :func:`load_config`, which reads the batch-script template (run it in a thread).

Keys (``-`` and ``_`` are the same in names, so mlflow-slurm's ``sbatch-script-file`` and
sbatch's ``cpus-per-task`` spellings work as given):

=====================  ==============================================================
``partition``          ``--partition``
``account``            ``--account``
``time``               ``--time`` (minutes as a number, or ``[D-]HH:MM:SS`` and the
                       other forms sbatch takes)
``mem``                ``--mem`` (MB as a number, or ``16G``)
``nodes``              ``--nodes`` (a number or ``min-max``)
``cpus_per_task``      ``--cpus-per-task``
``gres``               ``--gres`` (``gpu:1``, ``gpu:a100:2``)
``gpus_per_node``      ``--gpus-per-node``
``modules``            modules to ``module load`` before the run (a list, or one string)
``environment``        extra variables for the run: ``["NAME=value", ...]`` (mlflow-slurm's
                       form) or ``{"NAME": "value"}``; passed through sbatch's environment,
                       never written into the script
``exports``            mlflow-slurm's list of variable names to export; aioproj exports
                       the whole environment (sbatch's default), so they only get checked
``sbatch_args``        more sbatch options, each ``--name=value`` or ``-Xvalue`` (a list,
                       or one string split as a shell would)
``template``           a batch-script template file (a ``#!`` script with
                       ``{{ command }}`` where the run goes, optionally ``{{ modules }}``)
``sbatch_script_file`` the script's file name in the run directory (mlflow-slurm's key)
``shared_dir``         a directory the compute nodes see at the same path: run
                       directories, job output and environments go there
``arrays``             false: a sweep's trials go out one job each instead of as arrays
=====================  ==============================================================
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioproj._paths import cache_root
from aioproj.errors import BackendError

__all__ = [
    "CONFIG_KEYS",
    "SHARED_DIR_VAR",
    "SlurmConfig",
    "load_config",
    "parse_backend_config",
]

#: The environment variable naming the shared directory when backend_config does not.
SHARED_DIR_VAR = "AIOPROJ_SLURM_SHARED_DIR"

#: The keys the Slurm backend reads, in their documented spelling.
CONFIG_KEYS = (
    "partition",
    "account",
    "time",
    "mem",
    "nodes",
    "cpus_per_task",
    "gres",
    "gpus_per_node",
    "modules",
    "environment",
    "exports",
    "sbatch_args",
    "template",
    "sbatch_script_file",
    "shared_dir",
    "arrays",
)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)
_MEM = re.compile(r"\d+[KMGT]?", re.IGNORECASE)
_NODES = re.compile(r"\d+(-\d+)?")
_GPUS = re.compile(r"([A-Za-z0-9_.-]+:)?\d+")
_GRES = re.compile(r"[A-Za-z0-9_.:,/=+()-]+")
_WORD = re.compile(r"[^\s\x00-][^\s\x00]*")
_PLACEHOLDER = re.compile(r"\{\{\s*([^}]*?)\s*\}\}")
TEMPLATE_PLACEHOLDERS = ("command", "modules")

#: Options aioproj sets itself (output files, arrays, how sbatch answers, the
#: environment the run's tracking variables travel in), or that stop a submission.
_CONTROLLED_LONG = (
    "array",
    "output",
    "error",
    "parsable",
    "wait",
    "export",
    "export-file",
    "test-only",
    "wrap",
    "clusters",
    "help",
    "usage",
    "version",
)
_CONTROLLED_SHORT = {
    "a": "array",
    "o": "output",
    "e": "error",
    "W": "wait",
    "M": "clusters",
    "h": "help",
    "V": "version",
}
_SHORT_NAMES = {"p": "partition", "A": "account", "t": "time", "N": "nodes", "c": "cpus-per-task"}


@dataclass(frozen=True)
class SlurmConfig:
    """A checked backend_config. ``options`` are sbatch options, one argv item each."""

    options: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    #: Extra variables for the run (may hold secrets: never in the script or argv).
    environment: Mapping[str, str] = field(default_factory=dict, repr=False)
    template_path: str | None = None
    template: str | None = field(default=None, repr=False)
    script_name: str = "job.sh"
    shared_dir: Path = field(default_factory=lambda: cache_root() / "slurm")
    arrays: bool = True
    #: More than one node: the command starts with srun, once per node (mlflow-slurm's).
    use_srun: bool = False


def _fail(message: str) -> BackendError:
    return BackendError(f"Slurm backend_config: {message}")


def _normalized_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    unknown = []
    for key, value in config.items():
        name = str(key).strip().lower().replace("-", "_")
        if name not in CONFIG_KEYS:
            unknown.append(str(key))
            continue
        if name in out:
            raise _fail(f"{given[name]!r} and {key!r} are the same key; give it once.")
        out[name] = value
        given[name] = str(key)
    if unknown:
        raise _fail(
            f"unknown key(s) {sorted(unknown)}. The keys it reads are {list(CONFIG_KEYS)} "
            "('-' and '_' may be swapped, as in mlflow-slurm's 'sbatch-script-file')."
        )
    return out


def _text(key: str, value: Any, pattern: re.Pattern[str], expected: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _fail(f"'{key}' must be {expected}, got {type(value).__name__}.")
    text = str(value).strip()
    if isinstance(value, int) and value < 1:
        raise _fail(f"'{key}' must be {expected}, got {value!r}.")
    if not pattern.fullmatch(text):
        raise _fail(f"'{key}' must be {expected}, got {value!r}.")
    return text


def _strings(key: str, value: Any) -> list[str]:
    """A list of strings, or one string as a list of one."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _fail(f"'{key}' must be a list of strings, got {value!r}.")


def _check_no_control(key: str, text: str) -> None:
    if "\x00" in text or "\n" in text or "\r" in text:
        raise _fail(f"'{key}' has a NUL or line break in {text!r}.")


def _environment(value: Any) -> dict[str, str]:
    pairs: list[tuple[str, Any]] = []
    if isinstance(value, Mapping):
        pairs = [(str(k), v) for k, v in value.items()]
    else:
        for item in _strings("environment", value):
            name, sep, rest = item.partition("=")
            if not sep:
                raise _fail(
                    "'environment' items are NAME=value (mlflow-slurm's form), got an item "
                    f"without '=' starting {item[:20]!r}."
                )
            pairs.append((name.removeprefix("export ").strip(), rest))
    env: dict[str, str] = {}
    for name, raw in pairs:
        if not _NAME.fullmatch(name):
            raise _fail(
                f"'environment' has the variable name {name[:40]!r}, not a name a shell takes."
            )
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise _fail(f"'environment' value of {name} must be a string.")
        text = str(raw)
        if "\x00" in text:
            raise _fail(f"'environment' value of {name} has a NUL character.")
        env[name] = text
    return env


def _option_name(item: str) -> str:
    """The long name of an sbatch option item (``--qos=x`` → ``qos``, ``-q`` → ``q``)."""
    if item.startswith("--"):
        return item[2:].split("=", 1)[0]
    letter = item[1:2]
    return _CONTROLLED_SHORT.get(letter) or _SHORT_NAMES.get(letter) or letter


def _sbatch_args(value: Any, set_by_keys: Mapping[str, str]) -> list[str]:
    if isinstance(value, str):
        try:
            items = shlex.split(value)
        except ValueError as exc:
            raise _fail(f"'sbatch_args' cannot be split as a shell would: {exc}.") from None
    else:
        items = _strings("sbatch_args", value)
    for item in items:
        _check_no_control("sbatch_args", item)
        if not item.startswith("-") or item in ("-", "--") or item.startswith("---"):
            raise _fail(
                f"'sbatch_args' holds {item!r}, which is not an option: give each option "
                "with its value in one item, --name=value (or -Xvalue)."
            )
        name = _option_name(item)
        if item.startswith("--") and any(c.startswith(name) for c in _CONTROLLED_LONG):
            raise _fail(
                f"'sbatch_args' may not set {item.split('=', 1)[0]}: aioproj sets the array, "
                "the output files and the environment of its jobs itself."
            )
        if not item.startswith("--") and item[1:2] in _CONTROLLED_SHORT:
            raise _fail(
                f"'sbatch_args' may not set {item[:2]} (--{_CONTROLLED_SHORT[item[1:2]]}): "
                "aioproj sets it itself."
            )
        key = set_by_keys.get(name)
        if key is not None:
            raise _fail(
                f"'sbatch_args' sets --{name}, which the '{key}' key sets too; give it once."
            )
    return items


def parse_backend_config(config: Mapping[str, Any] | None) -> SlurmConfig:
    """Check ``config`` and turn it into a :class:`SlurmConfig` (without the template's
    text: see :func:`load_config`). Pure.

    Raises :class:`BackendError` naming the key: unknown keys (listing the known ones),
    values of the wrong type or form, ``sbatch_args`` items that are not options or
    that set what aioproj sets (``--array``, ``--output``, ``--export``...).
    """
    keys = _normalized_keys(config or {})
    options: list[str] = []
    set_by: dict[str, str] = {}

    def option(key: str, flag: str, pattern: re.Pattern[str], expected: str) -> None:
        if keys.get(key) is not None:
            options.append(f"--{flag}={_text(key, keys[key], pattern, expected)}")
            set_by[flag] = key

    option("partition", "partition", _WORD, "a partition name (or a comma-separated list)")
    option("account", "account", _WORD, "an account name")
    option("time", "time", _TIME, "a time limit: minutes, or [days-]hours:minutes:seconds")
    option("mem", "mem", _MEM, "a memory size: megabytes, or a number with K, M, G or T")
    option("nodes", "nodes", _NODES, "a number of nodes, or min-max")
    option("cpus_per_task", "cpus-per-task", re.compile(r"\d+"), "a positive number of CPUs")
    option("gres", "gres", _GRES, "a generic resource list such as gpu:1 or gpu:a100:2")
    option("gpus_per_node", "gpus-per-node", _GPUS, "a number of GPUs, or type:count")
    if keys.get("sbatch_args") is not None:
        options.extend(_sbatch_args(keys["sbatch_args"], set_by))

    modules: list[str] = []
    for entry in _strings("modules", keys.get("modules") or []):
        _check_no_control("modules", entry)
        modules.extend(entry.split())
    environment = _environment(keys.get("environment") or [])
    for name in _strings("exports", keys.get("exports") or []):
        if not _NAME.fullmatch(name.strip()):
            raise _fail(f"'exports' has {name[:40]!r}, not a variable name.")

    script = keys.get("sbatch_script_file") or "job.sh"
    if (
        not isinstance(script, str)
        or "/" in script
        or script in (".", "..")
        or "\x00" in script
        or not script.strip()
    ):
        raise _fail(
            f"'sbatch_script_file' must be a file name (it is written in each run's own "
            f"directory), got {script!r}."
        )
    template = keys.get("template")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise _fail(f"'template' must be the path of a batch-script template, got {template!r}.")
    shared = keys.get("shared_dir") or os.environ.get(SHARED_DIR_VAR)
    if shared is not None and (
        not isinstance(shared, str) or not shared.strip() or "\x00" in shared
    ):
        raise _fail(f"'shared_dir' must be a directory path, got {shared!r}.")
    arrays = keys.get("arrays", True)
    if not isinstance(arrays, bool):
        raise _fail(f"'arrays' must be true or false, got {arrays!r}.")
    nodes = str(keys.get("nodes") or "1").strip()
    return SlurmConfig(
        options=tuple(options),
        modules=tuple(modules),
        environment=environment,
        template_path=template,
        script_name=script,
        shared_dir=Path(shared).expanduser() if shared else cache_root() / "slurm",
        arrays=arrays,
        use_srun=nodes not in ("1", "1-1"),
    )


def check_template(text: str, path: str) -> None:
    """Raise :class:`BackendError` unless ``text`` is a batch-script template aioproj can
    fill: a ``#!`` first line, ``{{ command }}`` once, no other placeholder, no Jinja
    block (``{% ... %}``)."""
    if not text.startswith("#!"):
        raise BackendError(
            f"The Slurm batch-script template {path} must start with a #! line "
            "(sbatch runs it as a script), e.g. #!/bin/bash."
        )
    if "{%" in text:
        raise BackendError(
            f"The Slurm batch-script template {path} has a Jinja block ({{% ... %}}); "
            f"aioproj fills only the placeholders {list(TEMPLATE_PLACEHOLDERS)}: put the "
            "resources in #SBATCH lines or in backend_config."
        )
    names = _PLACEHOLDER.findall(text)
    unknown = sorted(set(names) - set(TEMPLATE_PLACEHOLDERS))
    if unknown:
        raise BackendError(
            f"The Slurm batch-script template {path} has the placeholder(s) {unknown}; "
            f"aioproj fills {list(TEMPLATE_PLACEHOLDERS)}."
        )
    if names.count("command") != 1:
        raise BackendError(
            f"The Slurm batch-script template {path} must have {{{{ command }}}} exactly "
            "once, where the run goes."
        )


def load_config(config: Mapping[str, Any] | None) -> SlurmConfig:
    """:func:`parse_backend_config`, then read and check the template and make the shared
    directory absolute (blocking: run it in a worker thread).

    Raises :class:`BackendError`: the config's errors, a template that cannot be read or
    is not one aioproj can fill.
    """
    parsed = parse_backend_config(config)
    shared = Path(os.path.abspath(parsed.shared_dir))
    text = None
    if parsed.template_path is not None:
        path = os.path.expanduser(parsed.template_path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise BackendError(
                f"Could not read the Slurm batch-script template 'template' {path}: {exc}"
            ) from exc
        check_template(text, path)
    return dataclasses.replace(parsed, template=text, shared_dir=shared)
