"""``python -m aioproj.testing.kubernetes [--port N] [--kubeconfig PATH] [--token T]``

Starts FakeKubernetes, writes a kubeconfig for it, prints where, and serves until
interrupted (Ctrl-C or SIGTERM); then every container process it started is killed.
"""

from __future__ import annotations

import argparse
import signal
import sys

import anyio

from . import FakeKubernetes


async def _serve(args: argparse.Namespace) -> None:
    async with FakeKubernetes(
        port=args.port, kubeconfig=args.kubeconfig, token=args.token, namespace=args.namespace
    ) as kube:
        print(f"FakeKubernetes listening on {kube.url}", flush=True)
        print(f"kubeconfig: {kube.kubeconfig}", flush=True)
        print(f"  kubectl --kubeconfig {kube.kubeconfig} get jobs", flush=True)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
    print("FakeKubernetes stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aioproj.testing.kubernetes",
        description="Run FakeKubernetes, an emulated Kubernetes API server and node.",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: free)")
    parser.add_argument("--kubeconfig", help="where to write the kubeconfig (default: temp)")
    parser.add_argument("--token", help="require this bearer token")
    parser.add_argument("--namespace", default="default", help="the context's namespace")
    args = parser.parse_args(argv)
    try:
        anyio.run(_serve, args)
    except OSError as exc:
        print(f"FakeKubernetes could not start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
