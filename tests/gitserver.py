"""Test servers on 127.0.0.1, each in a background thread.

``GitServer`` serves every git repository under a directory over git's smart HTTP protocol
(dulwich's WSGI app); ``FileServer`` serves plain files (archives). Both record the requests
they answer, can be slowed down, and are context managers.
"""

from __future__ import annotations

import base64
import http.server
import os
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from dulwich.repo import Repo
from dulwich.server import Backend, BackendRepo
from dulwich.web import make_wsgi_chain

__all__ = ["FileServer", "GitServer", "closed_port"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False


class _QuietWSGIHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _DirectoryBackend(Backend):
    """Serves ``<root>/<name>`` for URL path ``/<name>``; repositories opened once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._repos: dict[str, Repo] = {}
        self._lock = threading.Lock()

    def open_repository(self, path: str) -> BackendRepo:
        name = os.fsdecode(path).strip("/")
        with self._lock:
            if name not in self._repos:
                self._repos[name] = Repo(str(self.root / name))
            return self._repos[name]

    def close(self) -> None:
        with self._lock:
            for repo in self._repos.values():
                repo.close()
            self._repos.clear()


class _Recorder:
    """Thread-safe log of (method, path) plus an optional delay before answering."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.delay = 0.0
        self._lock = threading.Lock()

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))
        if self.delay:
            time.sleep(self.delay)

    def count(self, method: str | None = None, contains: str = "") -> int:
        with self._lock:
            return sum(
                1 for m, p in self.requests if (method is None or m == method) and contains in p
            )

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()


class GitServer(_Recorder):
    """Smart-HTTP git server for the repositories under ``root``.

    ``url("name")`` is the clone URL of ``root/name``; ``fetches()`` counts upload-pack
    POSTs (one per fetch), ``delay`` slows down those POSTs (seconds), and ``auth``
    (user, password) makes every request without those basic credentials get a 401.
    """

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.auth: tuple[str, str] | None = None
        self._backend = _DirectoryBackend(root)
        self._app = make_wsgi_chain(self._backend)
        self._server = make_server(
            "127.0.0.1",
            0,
            self._wsgi,
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietWSGIHandler,
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _wsgi(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        with self._lock:
            self.requests.append((method, path))
        if self.auth is not None and environ.get("HTTP_AUTHORIZATION") != self._expected_auth():
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="git"')])
            return [b"unauthorized"]
        if method == "POST" and self.delay:
            time.sleep(self.delay)
        return self._app(environ, start_response)

    def _expected_auth(self) -> str:
        assert self.auth is not None
        token = base64.b64encode(":".join(self.auth).encode()).decode()
        return f"Basic {token}"

    def reset(self) -> None:
        """Forget requests, delay and auth (between tests sharing one server)."""
        self.clear()
        self.delay = 0.0
        self.auth = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, name: str, userinfo: str = "") -> str:
        at = f"{userinfo}@" if userinfo else ""
        return f"http://{at}127.0.0.1:{self.port}/{name}"

    def fetches(self) -> int:
        return self.count("POST", "git-upload-pack")

    def __enter__(self) -> GitServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._backend.close()


class _FileHandler(http.server.SimpleHTTPRequestHandler):
    recorder: _Recorder

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.recorder.record("GET", self.path)
        super().do_GET()


class FileServer(_Recorder):
    """Static HTTP file server for ``root``: ``url("a.zip")``."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        handler = type("Handler", (_FileHandler,), {"recorder": self})
        self._server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(handler, directory=str(root))
        )
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{name}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
