"""The Slurm backend's pure parts: backend_config checks, batch scripts, parsing Slurm's
answers. Its state mapping has property tests in tests/test_properties_remote.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import pytest

from aioproj.backends.batch import TrialBatch
from aioproj.backends.slurm._arrays import ArrayCollector
from aioproj.backends.slurm._cli import parse_job_id, parse_sacct, parse_squeue
from aioproj.backends.slurm._config import (
    CONFIG_KEYS,
    check_template,
    load_config,
    parse_backend_config,
)
from aioproj.backends.slurm._script import RunPart, render_array_script, render_script
from aioproj.backends.slurm._state import JobInfo, describe_end
from aioproj.errors import BackendError

# -- how a job ended, in words -------------------------------------------------------


def test_describe_end_says_state_reason_and_code() -> None:
    assert describe_end("12", JobInfo("FAILED", "NonZeroExitCode", 3)) == (
        "Slurm job 12 ended FAILED (NonZeroExitCode, exit code 3)"
    )
    assert describe_end("7_2", JobInfo("TIMEOUT", "TimeLimit")) == (
        "Slurm job 7_2 ended TIMEOUT (TimeLimit)"
    )
    assert describe_end("5", JobInfo("CANCELLED", "None", 0, 15)) == (
        "Slurm job 5 ended CANCELLED (signal 15)"
    )


# -- Slurm's answers ---------------------------------------------------------------------


def test_squeue_lines_by_job_and_array_task() -> None:
    rows = parse_squeue(
        "12|12|RUNNING|None\n7_0|9|COMPLETED|None\n7_3|7|PENDING|JobArrayTaskLimit\njunk\n"
    )
    assert set(rows) == {"12", "7_0", "7_3"}
    assert rows["7_0"].raw_id == "9"
    assert rows["7_3"].info == JobInfo("PENDING", "JobArrayTaskLimit")


def test_sacct_lines_skip_steps_and_read_exit_codes() -> None:
    jobs = parse_sacct("2|FAILED|3:0\n2.batch|FAILED|3:0\n4_1|CANCELLED by 0|0:15\n")
    assert jobs == {
        "2": JobInfo("FAILED", exit_code=3, signal=0),
        "4_1": JobInfo("CANCELLED", exit_code=0, signal=15),
    }


def test_job_ids_sbatch_prints() -> None:
    assert parse_job_id("123\n") == "123"
    assert parse_job_id("123;cluster\n") == "123"
    with pytest.raises(BackendError, match="without a job id"):
        parse_job_id("sbatch: error: no")


# -- backend_config ----------------------------------------------------------------------


def test_options_from_keys_in_both_spellings() -> None:
    config = parse_backend_config(
        {
            "partition": "gpu",
            "account": "lab",
            "time": "02:00:00",
            "mem": "16G",
            "nodes": 1,
            "cpus-per-task": 4,
            "gres": "gpu:1",
            "gpus_per_node": "a100:2",
            "sbatch_args": ["--qos=high", "-Cv100"],
        }
    )
    assert config.options == (
        "--partition=gpu",
        "--account=lab",
        "--time=02:00:00",
        "--mem=16G",
        "--nodes=1",
        "--cpus-per-task=4",
        "--gres=gpu:1",
        "--gpus-per-node=a100:2",
        "--qos=high",
        "-Cv100",
    )
    assert not config.use_srun


def test_mlflow_slurm_config_is_accepted_as_given() -> None:
    config = parse_backend_config(
        {
            "partition": "cpu",
            "account": "bbmi-delta-cpu",
            "mem": "14g",
            "modules": ["anaconda3_gpu", "cudnn"],
            "gpus_per_node": "1",
            "nodes": 2,
            "time": "0:30:00",
            "environment": ["WANDB_MODE=offline", "export OMP_NUM_THREADS=4"],
            "exports": ["HOME"],
            "sbatch-script-file": "train.sbatch",
        }
    )
    assert config.modules == ("anaconda3_gpu", "cudnn")
    assert dict(config.environment) == {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "4"}
    assert config.script_name == "train.sbatch"
    assert config.use_srun  # more than one node: srun runs the command on each


def test_unknown_keys_are_errors_that_list_the_known_ones() -> None:
    with pytest.raises(BackendError) as info:
        parse_backend_config({"partition": "debug", "partiton": "gpu", "gpus": 1})
    message = str(info.value)
    assert "['gpus', 'partiton']" in message
    for key in CONFIG_KEYS:
        assert key in message


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"time": "two hours"}, "'time' must be a time limit"),
        ({"time": 0}, "'time' must be a time limit"),
        ({"mem": "lots"}, "'mem' must be a memory size"),
        ({"nodes": "x"}, "'nodes' must be a number of nodes"),
        ({"cpus_per_task": True}, "'cpus_per_task' must be a positive number"),
        ({"partition": "a b"}, "'partition' must be a partition name"),
        ({"partition": "--wrap=x"}, "'partition' must be a partition name"),
        ({"gres": "gpu 1"}, "'gres' must be a generic resource"),
        ({"modules": [1]}, "'modules' must be a list of strings"),
        ({"modules": ["cuda\nrm -rf /"]}, "NUL or line break"),
        ({"environment": ["NOEQUALS"]}, "items are NAME=value"),
        ({"environment": {"BAD-NAME": "x"}}, "not a name a shell takes"),
        ({"sbatch_args": ["--qos", "high"]}, "'high', which is not an option"),
        ({"sbatch_args": ["--array=0-9"]}, "may not set --array"),
        ({"sbatch_args": ["--arr=0-9"]}, "may not set --arr"),
        ({"sbatch_args": "--output=/tmp/x"}, "may not set --output"),
        ({"sbatch_args": ["--export=NONE"]}, "may not set --export"),
        ({"sbatch_args": ["-o/tmp/x"]}, "may not set -o"),
        ({"sbatch_args": ["--wait"]}, "may not set --wait"),
        ({"sbatch_args": ["--clusters=other"]}, "may not set --clusters"),
        ({"partition": "a", "sbatch_args": ["-pb"]}, "the 'partition' key sets too"),
        ({"time": 5, "sbatch_args": ["--time=9"]}, "the 'time' key sets too"),
        ({"sbatch_args": "--comment='open"}, "cannot be split"),
        ({"sbatch_script_file": "../x.sh"}, "must be a file name"),
        ({"arrays": "no"}, "'arrays' must be true or false"),
        ({"template": 3}, "'template' must be the path"),
        ({"partition": "a", "PARTITION": "b"}, "are the same key"),
    ],
)
def test_bad_values_name_the_key(config: dict[str, object], words: str) -> None:
    with pytest.raises(BackendError, match="Slurm backend_config") as info:
        parse_backend_config(config)
    assert words in str(info.value)


def test_environment_values_stay_out_of_the_repr() -> None:
    config = parse_backend_config({"environment": {"API_TOKEN": "s3cr3t-value"}})
    assert "s3cr3t-value" not in repr(config)


def test_templates_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.sh"
    good.write_text("#!/bin/bash\n#SBATCH --qos=low\nset -u\n{{ modules }}\n{{ command }}\n")
    config = load_config({"template": str(good)})
    assert config.template is not None
    assert config.template.startswith("#!/bin/bash")
    for text, words in [
        ("echo hi\n{{ command }}\n", "must start with a #! line"),
        ("#!/bin/bash\n{% if x %}{% endif %}{{ command }}\n", "Jinja block"),
        ("#!/bin/bash\n{{ run_id }}\n{{ command }}\n", "['run_id']"),
        ("#!/bin/bash\necho no command\n", "exactly once"),
    ]:
        with pytest.raises(BackendError, match="template") as info:
            check_template(text, "t.sh")
        assert words in str(info.value)
    with pytest.raises(BackendError, match="Could not read"):
        load_config({"template": str(tmp_path / "missing.sh")})


# -- batch scripts -----------------------------------------------------------------------


def _part(run_id: str, command: str) -> RunPart:
    return RunPart(
        run_id=run_id,
        experiment_id="1",
        work_dir="/shared/proj dir",
        command=command,
        env_vars={"PATH": "/env/bin:/usr/bin"},
    )


def _bash(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "job.sh"
    path.write_text(script)
    return subprocess.run(
        ["bash", str(path)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}
    )


def test_a_script_runs_the_command_as_bash_c_in_the_project(tmp_path: Path) -> None:
    project = tmp_path / "proj dir"
    project.mkdir()
    hostile = 'it\'s $(echo no) `echo no` "q"\nline2'
    part = RunPart(
        run_id="r1",
        experiment_id="7",
        work_dir=str(project),
        command=(
            f'printf \'%s|\' "$MLFLOW_RUN_ID" "$MLFLOW_EXPERIMENT_ID" "$PWD" '
            f'"$EXTRA"; exit 4  # {hostile}'
        ),
        env_vars={"EXTRA": hostile},
    )
    script = render_script(part)
    assert script.startswith("#!/bin/bash\n")
    done = _bash(script, tmp_path)
    assert done.returncode == 4  # exec: the job's exit status is the command's
    assert done.stdout == f"r1|7|{project}|{hostile}|"


def test_modules_and_templates(tmp_path: Path) -> None:
    part = _part("r1", "true")
    plain = render_script(part, modules=("cuda/12.1", "cudnn"))
    assert "module load cuda/12.1 cudnn\n" in plain
    template = "#!/bin/sh\n#SBATCH --qos=low\nsetup\n{{ modules }}\nbefore\n{{ command }}\n"
    text = render_script(part, modules=("m1",), template=template)
    lines = text.splitlines()
    assert lines[:5] == ["#!/bin/sh", "#SBATCH --qos=low", "setup", "module load m1", "before"]
    assert lines[-1].startswith("exec bash -c true")
    # Without {{ modules }}, modules are loaded just before the run.
    text = render_script(part, modules=("m1",), template="#!/bin/sh\n{{ command }}")
    assert text.splitlines()[1] == "module load m1"
    assert text.endswith("\n")


def test_an_array_script_runs_each_task_s_own_run(tmp_path: Path) -> None:
    parts = [
        RunPart(f"run{i}", "1", str(tmp_path), f"echo task {i} $MLFLOW_RUN_ID; exit {i}")
        for i in range(3)
    ]
    # A multi-line command inside a case branch must stay intact.
    parts.append(RunPart("run3", "1", str(tmp_path), "echo 'a\n;;\nb'"))
    script = render_array_script(parts)
    for i in range(3):
        done = _bash(script, tmp_path, SLURM_ARRAY_TASK_ID=str(i))
        assert (done.returncode, done.stdout) == (i, f"task {i} run{i}\n")
    done = _bash(script, tmp_path, SLURM_ARRAY_TASK_ID="3")
    assert (done.returncode, done.stdout) == (0, "a\n;;\nb\n")
    done = _bash(script, tmp_path, SLURM_ARRAY_TASK_ID="9")
    assert done.returncode == 1
    assert "array task 9 has no run" in done.stderr


def test_srun_starts_a_multi_node_command() -> None:
    part = RunPart("r", "1", "/p", "python train.py", use_srun=True)
    assert part.render().splitlines()[-1] == "exec srun --export=ALL bash -c 'python train.py'"


# -- grouping a sweep's starts into arrays ------------------------------------------------


@pytest.mark.anyio
async def test_runs_of_a_batch_are_submitted_together() -> None:
    submitted: list[tuple[list[int], int]] = []
    fail = [False]

    async def submit(members: list[int], max_parallel: int) -> list[str]:
        submitted.append((list(members), max_parallel))
        if fail[0]:
            raise BackendError("sbatch refused the job: no")
        return [f"job_{m}" for m in members]

    collector: ArrayCollector[int, str] = ArrayCollector(submit, quiet=0.2, longest=5.0)
    batch = TrialBatch(key="sweep", size=5, max_parallel=2)
    got: dict[int, str] = {}

    async def join(member: int, delay: float, key: str = "same") -> None:
        await anyio.sleep(delay)
        got[member] = await collector.join(batch, key, member)

    # Four arrive within the quiet window, one with other options: two submissions.
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            for member in range(4):
                tg.start_soon(join, member, 0.01 * member)
            tg.start_soon(join, 4, 0.0, "other options")
    assert got == {m: f"job_{m}" for m in range(5)}
    assert sorted(submitted) == [([0, 1, 2, 3], 2), ([4], 2)]

    # A failed submission raises in every member; their retries form a group again.
    fail[0] = True
    batch = TrialBatch(key="sweep 2", size=2, max_parallel=2)
    errors: list[BaseException] = []

    async def join_failing(member: int) -> None:
        try:
            await collector.join(batch, "same", member)
        except BackendError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(join_failing, 10)
        tg.start_soon(join_failing, 11)
    assert len(errors) == 2
    assert errors[0] is not errors[1]
    assert all("sbatch refused" in str(e) for e in errors)
    fail[0] = False
    submitted.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(join, 10, 0.0)
        tg.start_soon(join, 11, 0.05)
    assert submitted == [([10, 11], 2)]
