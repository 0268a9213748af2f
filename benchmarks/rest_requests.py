"""HTTP requests one run makes to an MLflow tracking server: aioproj versus MLflow.

Starts a real ``mlflow server`` (sqlite, 127.0.0.1) behind a small counting proxy, then
runs the same trivial local project once with ``aioproj.run`` and once with
``mlflow.projects.run`` (env manager ``local``, synchronous), and prints each one's
requests to the tracking API, from the run's creation to its final status. With
``-n N`` it also times N concurrent aioproj runs tracked on the server.

    python benchmarks/rest_requests.py
    python benchmarks/rest_requests.py -n 50
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.server
import socketserver
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.mlflow_server import MlflowServer, free_port

MLPROJECT = """\
name: noop
entry_points:
  main:
    parameters:
      alpha: {type: float, default: 0.5}
    command: "python -c 'print(1)'"
"""


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.paths: collections.Counter[str] = collections.Counter()

    def take(self) -> collections.Counter[str]:
        with self.lock:
            out, self.paths = self.paths, collections.Counter()
        return out


def _proxy(target: str, counter: _Counter) -> tuple[socketserver.ThreadingTCPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if self.path.startswith("/api/") or self.path.startswith("/ajax-api/"):
                with counter.lock:
                    counter.paths[f"{self.command} {self.path.split('?')[0]}"] += 1
            request = urllib.request.Request(
                target + self.path, data=body, method=self.command,
                headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    data, status, headers = answer.read(), answer.status, answer.headers
            except urllib.error.HTTPError as exc:
                data, status, headers = exc.read(), exc.code, exc.headers
            self.send_response(status)
            for key, value in headers.items():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}"


def _show(name: str, paths: collections.Counter[str]) -> None:
    print(f"{name}: {sum(paths.values())} requests")
    for path, count in sorted(paths.items()):
        print(f"    {count} x {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=0, help="also time N concurrent aioproj runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aioproj-rest-") as tmp:
        root = Path(tmp)
        project = root / "proj"
        project.mkdir()
        (project / "MLproject").write_text(MLPROJECT)
        server = MlflowServer(root / "server")
        server.start()
        counter = _Counter()
        proxy, uri = _proxy(server.uri, counter)
        try:
            import aioproj

            async def one() -> None:
                async with aioproj.Runner(tracking_uri=uri, echo="off") as runner:
                    await runner.run(str(project), env_manager="local", experiment_name="a")
                    counter.take()  # the experiment exists now: count the second run only
                    await runner.run(str(project), env_manager="local", experiment_name="a")

            asyncio.run(one())
            _show("aioproj.run", counter.take())

            import mlflow

            mlflow.set_tracking_uri(uri)
            mlflow.projects.run(str(project), env_manager="local", experiment_name="a")
            counter.take()
            mlflow.projects.run(str(project), env_manager="local", experiment_name="a")
            _show("mlflow.projects.run", counter.take())

            if args.n:

                async def many() -> float:
                    async with aioproj.Runner(tracking_uri=uri, echo="off") as runner:
                        started = time.perf_counter()
                        await asyncio.gather(
                            *[
                                runner.run(str(project), env_manager="local",
                                           experiment_name="a")
                                for _ in range(args.n)
                            ]
                        )  # fmt: skip
                        return time.perf_counter() - started

                elapsed = asyncio.run(many())
                paths = counter.take()
                print(
                    f"{args.n} concurrent aioproj runs tracked on the server: {elapsed:.2f} s,"
                    f" {sum(paths.values())} requests"
                )
        finally:
            proxy.shutdown()
            server.stop()


if __name__ == "__main__":
    main()
