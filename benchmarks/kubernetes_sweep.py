"""N Kubernetes Jobs through aioproj against FakeKubernetes: requests, watches, wall time.

Each round submits N runs of a one-line project (``echo run {i}``, docker_env image
ignored by the emulator, code shipped in a ConfigMap) with ``synchronous=False`` all at
once, then awaits them. FakeKubernetes runs in the same process and counts every request.
Printed per round: wall time, watch connections per (resource, namespace), list requests,
per-run status requests (GETs of a single Job or Pod: should be 0), the requests per Job
by verb, and what MLflow's backend would send for the same wall time (one
``read_namespaced_job_status`` per run every 5 s, at least one each).

    python benchmarks/kubernetes_sweep.py              # N = 50, 200
    python benchmarks/kubernetes_sweep.py -n 20

Target (DESIGN.md §5): one watch connection per namespace and resource; zero per-run
status polls.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

import aioproj
from aioproj.testing.kubernetes import FakeKubernetes

MLPROJECT = """\
name: sweep
docker_env:
  image: python:3.11-slim
entry_points:
  main:
    parameters:
      i: {type: int, default: 0}
    command: "echo run {i}"
"""

TEMPLATE = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"name": "placeholder", "namespace": "default"},
    "spec": {
        "backoffLimit": 0,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "placeholder", "image": "placeholder"}],
            }
        },
    },
}


async def one_round(n: int, root: Path) -> None:
    project = root / "project"
    project.mkdir(exist_ok=True)
    (project / "MLproject").write_text(MLPROJECT)
    template = root / "job.yaml"
    template.write_text(yaml.safe_dump(TEMPLATE))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    async with FakeKubernetes(env=env, retention=100_000) as kube:
        config = {
            "kube-context": kube.context,
            "kube-config-path": str(kube.kubeconfig),
            "kube-job-template-path": str(template),
            "repository-uri": "registry.example.com/sweep",
        }
        uri = (root / f"mlruns-{n}").as_uri()
        started = time.perf_counter()
        async with aioproj.Runner(tracking_uri=uri, echo="off") as runner:
            runs = await asyncio.gather(
                *(
                    runner.run(
                        str(project),
                        backend="kubernetes",
                        parameters={"i": i},
                        synchronous=False,
                        backend_config=config,
                    )
                    for i in range(n)
                )
            )
            statuses = await asyncio.gather(*(asyncio.ensure_future(_final(r)) for r in runs))
        wall = time.perf_counter() - started
        finished = Counter(s.value for s in statuses)
        verbs = Counter(r.verb for r in kube.requests)
        per_run_status = sum(
            1 for r in kube.requests if r.verb == "get" and r.resource in ("jobs", "pods")
        )
        mlflow_polls = n * max(1, math.ceil(wall / 5.0))
        print(f"N = {n}: wall {wall:.2f} s, statuses {dict(finished)}")
        for (resource, namespace), count in sorted(kube.watch_connections.items()):
            print(f"  watch connections {resource:<5} in {namespace}: {count}")
        print(f"  list requests: {verbs['list']}")
        print(f"  per-run status requests (GET one Job/Pod): {per_run_status}")
        per_job = ", ".join(f"{verb} {count / n:.2f}" for verb, count in sorted(verbs.items()))
        print(f"  requests per Job: {sum(verbs.values()) / n:.2f} ({per_job})")
        print(
            f"  MLflow (one status GET per run every 5 s) over {wall:.1f} s: "
            f"≥ {mlflow_polls} status GETs, {n} polling threads"
        )


async def _final(run: aioproj.SubmittedRun) -> aioproj.RunStatus:
    return await run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, action="append", help="number of Jobs (repeatable)")
    args = parser.parse_args()
    for n in args.n or [50, 200]:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(one_round(n, Path(tmp)))


if __name__ == "__main__":
    main()
