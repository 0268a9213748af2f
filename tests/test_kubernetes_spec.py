"""The Kubernetes backend's pure logic: backend_config checks, names, the Job built from a
template, the environment plan, the bundle, and status from Job conditions and pods."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from aioproj.backends.kubernetes._spec import (
    BUNDLE_DIR,
    BUNDLE_MAX_BYTES,
    CODE_DIR,
    JobPlan,
    build_job,
    bundle_project,
    dns_label,
    job_name,
    parse_backend_config,
    plan_env,
)
from aioproj.backends.kubernetes._state import job_outcome, pod_problem, run_status
from aioproj.errors import BackendError
from aioproj.handle import RunStatus

TEMPLATE: dict[str, Any] = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"name": "x", "namespace": "ml"},
    "spec": {
        "backoffLimit": 0,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "x",
                        "image": "x",
                        "command": ["x"],
                        "env": [{"name": "KEEP", "value": "1"}],
                    },
                    {"name": "sidecar", "image": "envoy"},
                ],
            }
        },
    },
}


def write_template(tmp_path: Path, template: Any = TEMPLATE) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(template))
    return str(path)


def test_parse_backend_config_keeps_mlflows_keys(tmp_path: Path) -> None:
    path = write_template(tmp_path)
    parsed = parse_backend_config(
        {"kube-job-template-path": path, "repository-uri": "r/x", "kube-context": "c"}
    )
    assert (parsed.kube_context, parsed.repository_uri, parsed.template_path) == ("c", "r/x", path)
    assert parsed.template["metadata"]["namespace"] == "ml"
    assert parsed.pending_timeout == 600.0
    no_context = parse_backend_config({"kube-job-template-path": path, "repository-uri": "r"})
    assert no_context.kube_context is None


def test_unknown_backend_config_keys_are_warned_about_by_name_only(tmp_path: Path) -> None:
    path = write_template(tmp_path)
    with pytest.warns(UserWarning, match=r"Unknown key\(s\) \['kube_contxt'\]") as caught:
        parse_backend_config(
            {"kube-job-template-path": path, "repository-uri": "r", "kube_contxt": "s3cr3t"}
        )
    assert "s3cr3t" not in str(caught[0].message)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("- a list", "must be a YAML mapping"),
        ({"kind": "Deployment"}, "has kind 'Deployment'"),
        ({"kind": "Job", "spec": {"template": {"spec": {"containers": []}}}}, "at least one"),
        ("key: [unclosed", "not valid YAML"),
    ],
)
def test_bad_templates_are_named(tmp_path: Path, template: Any, message: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(template if isinstance(template, str) else yaml.safe_dump(template))
    with pytest.raises(BackendError, match=message) as caught:
        parse_backend_config({"kube-job-template-path": str(path), "repository-uri": "r"})
    assert str(path) in str(caught.value)


def test_names_are_dns_1123_and_short_enough() -> None:
    assert dns_label("My_Project.v2 (final)") == "my-project-v2-final"
    assert dns_label("My_Project.v2") == "my-project-v2"
    assert dns_label("___") == "mlflow-project"
    name = job_name("A" * 100, "0123456789")
    assert len(name) <= 63
    assert name.endswith("-0123456789")
    assert name == name.lower()


def plan(**kw: Any) -> JobPlan:
    values = {
        "name": "proj-abc",
        "namespace": "ml",
        "project_name": "Proj",
        "image": "python:3.11",
        "command": "python train.py --alpha 'a b'",
        "env": plan_env(
            {
                "MLFLOW_RUN_ID": "r1",
                "MLFLOW_TRACKING_URI": "file:///t",
                "MLFLOW_EXPERIMENT_ID": "0",
            },
            (),
            {},
            credential_names=(),
        ),
        "run_id": "r1",
        "bundle_configmap": "proj-abc-code",
    }
    values.update(kw)
    return JobPlan(**values)


def test_build_job_fills_the_template_as_mlflow_and_adds_the_bundle() -> None:
    job = build_job(TEMPLATE, plan())
    assert job["metadata"]["name"] == "proj-abc"
    assert job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["labels"]["aioproj.dev/run-id"] == "r1"
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "aioproj"
    first, sidecar = pod["spec"]["containers"]
    assert sidecar == {"name": "sidecar", "image": "envoy"}  # only the first is changed
    assert first["name"] == "proj"
    assert first["image"] == "python:3.11"
    assert first["command"][:2] == ["sh", "-c"]
    script = first["command"][2]
    assert f"tar -xzf {BUNDLE_DIR}/project.tar.gz -C {CODE_DIR}" in script
    assert script.endswith("python train.py --alpha 'a b'")
    assert [e["name"] for e in first["env"]] == [
        "KEEP",
        "MLFLOW_RUN_ID",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_ID",
    ]
    assert {"name": "aioproj-bundle", "configMap": {"name": "proj-abc-code"}} in (
        pod["spec"]["volumes"]
    )
    assert first["workingDir"] == CODE_DIR
    assert TEMPLATE["spec"]["template"]["spec"]["containers"][0]["name"] == "x"  # not mutated


def test_build_job_without_bundle_runs_the_command_in_the_image() -> None:
    job = build_job(TEMPLATE, plan(bundle_configmap=None, docker_volumes=("/h:/c:ro",)))
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["sh", "-c", "python train.py --alpha 'a b'"]
    assert "workingDir" not in container
    assert container["volumeMounts"] == [
        {"name": "docker-volume-0", "mountPath": "/c", "readOnly": True}
    ]
    with pytest.raises(BackendError, match="host_path:container_path"):
        build_job(TEMPLATE, plan(docker_volumes=("justone",)))


def test_plan_env_honours_kube_tracking_uri_and_keeps_copied_values_secret() -> None:
    env = plan_env(
        {
            "MLFLOW_RUN_ID": "r",
            "MLFLOW_TRACKING_URI": "http://outside",
            "MLFLOW_EXPERIMENT_ID": "3",
            "MLFLOW_ALLOW_FILE_STORE": "true",
        },
        (("DEFINED", "v"), "COPIED"),
        {
            "KUBE_MLFLOW_TRACKING_URI": "http://inside",
            "COPIED": "s3cr3t",
            "MLFLOW_TRACKING_TOKEN": "tok",
        },
        credential_names=("MLFLOW_TRACKING_TOKEN",),
    )
    assert env.values[:3] == [
        ("MLFLOW_RUN_ID", "r"),
        ("MLFLOW_TRACKING_URI", "http://inside"),
        ("MLFLOW_EXPERIMENT_ID", "3"),
    ]
    assert ("DEFINED", "v") in env.values
    assert dict(env.secret) == {"COPIED": "s3cr3t", "MLFLOW_TRACKING_TOKEN": "tok"}
    job = build_job(TEMPLATE, plan(env=env, env_secret="proj-abc-env"))
    assert "s3cr3t" not in str(job)
    assert "s3cr3t" not in repr(plan(env=env))
    assert "tok" not in str(job)
    with pytest.raises(BackendError, match="but COPIED was not set"):
        plan_env({}, ("COPIED",), {}, credential_names=())


def test_bundle_is_deterministic_and_leaves_out_mlruns_and_git(tmp_path: Path) -> None:
    project = tmp_path / "p"
    (project / "mlruns" / "0").mkdir(parents=True)
    (project / ".git").mkdir()
    (project / "src").mkdir()
    (project / "MLproject").write_text("name: p\n")
    (project / "src" / "a.py").write_text("print(1)\n")
    (project / "mlruns" / "0" / "meta.yaml").write_text("x")
    first = bundle_project(project)
    (project / "src" / "a.py").touch()  # a new mtime changes nothing
    assert bundle_project(project) == first
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        names = tar.getnames()
        assert {m.mtime for m in tar.getmembers()} == {0}
    assert names == ["MLproject", "src", "src/a.py"]


def test_bundle_above_the_configmap_limit_is_a_clear_error(tmp_path: Path) -> None:
    import os

    project = tmp_path / "p"
    project.mkdir()
    (project / "data.bin").write_bytes(os.urandom(BUNDLE_MAX_BYTES + 1))
    with pytest.raises(BackendError, match="build_image=True") as caught:
        bundle_project(project)
    assert "ConfigMap" in str(caught.value)


def job(*conditions: tuple[str, str], **status: Any) -> dict[str, Any]:
    return {
        "status": {
            **status,
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": f"{r} happened"}
                for t, r in conditions
            ],
        }
    }


def pod(state: dict[str, Any], *, phase: str = "Pending", **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p-1"},
        "status": {"phase": phase, "containerStatuses": [{"name": "c", "state": state, **extra}]},
    }


def test_status_from_job_conditions_and_pods() -> None:
    assert run_status(None, []) is RunStatus.SCHEDULED
    assert (
        run_status(job(startTime="t"), [pod({"waiting": {"reason": "ContainerCreating"}})])
        is RunStatus.SCHEDULED
    )
    assert run_status(job(), [pod({"running": {}}, phase="Running")]) is RunStatus.RUNNING
    assert run_status(job(("SuccessCriteriaMet", "CompletionsReached")), []) is RunStatus.FINISHED
    assert run_status(job(("Complete", "CompletionsReached")), []) is RunStatus.FINISHED
    assert run_status(job(("FailureTarget", "BackoffLimitExceeded")), []) is RunStatus.FAILED
    outcome = job_outcome(job(("Failed", "DeadlineExceeded")))
    assert outcome == (RunStatus.FAILED, "DeadlineExceeded: DeadlineExceeded happened")
    not_true = {"status": {"conditions": [{"type": "Failed", "status": "False"}]}}
    assert job_outcome(not_true) is None


def test_pod_problems_in_words() -> None:
    pull = pod({"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling "x"'}})
    assert pod_problem(pull) == (
        'pod p-1: container c is ImagePullBackOff: Back-off pulling "x"',
        True,
    )
    crash = pod({"waiting": {"reason": "CrashLoopBackOff"}})
    assert pod_problem(crash) == ("pod p-1: container c is CrashLoopBackOff", False)
    oom = pod({"running": {}}, lastState={"terminated": {"reason": "OOMKilled", "exitCode": 137}})
    text, stuck = pod_problem(oom) or ("", True)
    assert "OOMKilled (exit code 137)" in text
    assert not stuck
    unschedulable = {
        "metadata": {"name": "p-2"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available",
                }
            ],
        },
    }
    assert pod_problem(unschedulable) == ("pod p-2 is Unschedulable: 0/3 nodes are available", True)
    assert pod_problem(pod({"running": {}}, phase="Running")) is None
