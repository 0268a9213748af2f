"""Batch scripts: what sbatch runs for one run, or for the runs of a job array. Pure.

A run's part of a script sets its MLflow run and experiment ids and the prepared
environment's variables, enters the project directory and ``exec``\\ s the entry point's
command with ``bash -c``, as the local backend runs it, so the job's exit status is the
command's. Nothing secret goes into a script: tracking credentials and the
``environment`` of backend_config reach the job through sbatch's environment.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["RunPart", "render_array_script", "render_script"]

_PLACEHOLDER = re.compile(r"\{\{\s*(command|modules)\s*\}\}")


@dataclass(frozen=True)
class RunPart:
    """One run's part of a batch script."""

    run_id: str
    experiment_id: str
    work_dir: str
    #: The entry point's command inside its environment (``source activate && ...``).
    command: str
    #: The prepared environment's variables (``PATH``, ``VIRTUAL_ENV``); not secrets.
    env_vars: Mapping[str, str] = field(default_factory=dict)
    #: Start the command with ``srun`` (one task per node of a multi-node job).
    use_srun: bool = False

    def render(self) -> str:
        exports = {
            "MLFLOW_RUN_ID": self.run_id,
            "MLFLOW_EXPERIMENT_ID": self.experiment_id,
            **self.env_vars,
        }
        lines = [f"export {name}={shlex.quote(value)}" for name, value in exports.items()]
        lines.append(f"cd -- {shlex.quote(self.work_dir)} || exit 1")
        runner = "srun --export=ALL bash -c" if self.use_srun else "bash -c"
        lines.append(f"exec {runner} {shlex.quote(self.command)}")
        return "\n".join(lines)


def _modules(modules: Sequence[str]) -> str:
    if not modules:
        return ""
    return "module load " + " ".join(shlex.quote(m) for m in modules)


def _fill(template: str | None, header: str, body: str, modules: Sequence[str]) -> str:
    module_lines = _modules(modules)
    if template is None:
        parts = ["#!/bin/bash", header]
        if module_lines:
            parts.append(module_lines)
        parts.append(body)
        return "\n".join(parts) + "\n"
    has_modules = "modules" in {m.group(1) for m in _PLACEHOLDER.finditer(template)}

    def replace(match: re.Match[str]) -> str:
        if match.group(1) == "modules":
            return module_lines
        if module_lines and not has_modules:
            return f"{module_lines}\n{header}\n{body}"
        return f"{header}\n{body}"

    text = _PLACEHOLDER.sub(replace, template)
    return text if text.endswith("\n") else text + "\n"


def render_script(
    part: RunPart, *, modules: Sequence[str] = (), template: str | None = None
) -> str:
    """The batch script of one run: ``template`` (checked by
    :func:`~aioproj.backends.slurm._config.check_template`) with ``{{ modules }}`` and
    ``{{ command }}`` filled, or a plain bash script."""
    header = f"# aioproj: MLflow run {part.run_id}"
    return _fill(template, header, part.render(), modules)


def render_array_script(
    parts: Sequence[RunPart], *, modules: Sequence[str] = (), template: str | None = None
) -> str:
    """The batch script of a job array whose task ``i`` runs ``parts[i]``."""
    branches = []
    for index, part in enumerate(parts):
        # Not indented: a quoted command or value may span lines.
        branches.append(f"{index})\n{part.render()}\n;;")
    branches.append(
        '*)\necho "aioproj: array task $SLURM_ARRAY_TASK_ID has no run" >&2\nexit 1\n;;'
    )
    body = 'case "$SLURM_ARRAY_TASK_ID" in\n' + "\n".join(branches) + "\nesac"
    header = f"# aioproj: {len(parts)} MLflow runs, one per array task"
    return _fill(template, header, body, modules)
