"""A reverse proxy that misbehaves on request, for tests of crashes and outages.

``FaultProxy(target)`` forwards every HTTP request to ``target`` (a tracking server, an
emulator) and answers with what it answered, streaming included (a Kubernetes watch),
unless a fault is armed:

- :meth:`hold`: forward the matching request, then keep its answer back until the proxy
  stops: the client waits, as it would for a server that applied a change and then hung
  (the moment to kill the client);
- :meth:`drop_answer`: forward the matching request, then close the connection without
  answering: the change is made, the answer lost;
- :meth:`reject`: answer the matching request with an error status, unforwarded;
- :meth:`refuse`: refuse every connection for some seconds (a server down, then back).

It runs in a thread with its own event loop, so sync and async tests use it alike.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from .mlflow_server import free_port

_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}
)


@dataclass
class _Fault:
    kind: str  # "hold", "drop" or "reject"
    method: str
    path: str
    count: int
    after: int = 0
    seen: int = 0
    matched: int = 0
    arrived: threading.Event = field(default_factory=threading.Event)


class FaultProxy:
    """An HTTP reverse proxy to ``target`` on 127.0.0.1 with faults to arm. A context
    manager: started on enter, stopped (held requests released) on exit."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: (method, path) of every request that reached the proxy.
        self.requests: list[tuple[str, str]] = []
        self._faults: list[_Fault] = []
        self._refuse_until = 0.0
        self._reject_status = 400
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None

    # -- faults ------------------------------------------------------------------------

    def hold(self, method: str, path: str, *, count: int = 1, after: int = 0) -> threading.Event:
        """Let ``after`` matching requests through, then forward the next ``count`` and
        keep their answers back; the returned event is set when the first of those has
        been forwarded (the change is made)."""
        return self._arm("hold", method, path, count, after)

    def drop_answer(self, method: str, path: str, *, count: int = 1) -> threading.Event:
        """Forward the next ``count`` matching requests, then close their connections."""
        return self._arm("drop", method, path, count)

    def reject(
        self, method: str, path: str, *, status: int = 400, count: int = 1, after: int = 0
    ) -> threading.Event:
        """Let ``after`` matching requests through, then answer ``count`` with ``status``
        (and an MLflow-style error body) without forwarding them."""
        event = self._arm("reject", method, path, count, after)
        self._reject_status = status
        return event

    def refuse(self, seconds: float) -> None:
        """Refuse every connection for ``seconds`` from now."""
        self._refuse_until = time.monotonic() + seconds

    def clear(self) -> None:
        """Disarm every fault (held answers stay held until the proxy stops)."""
        with self._lock:
            self._faults.clear()
        self._refuse_until = 0.0

    def _arm(
        self, kind: str, method: str, path: str, count: int, after: int = 0
    ) -> threading.Event:
        fault = _Fault(kind, method.upper(), path, count, after)
        with self._lock:
            self._faults.append(fault)
        return fault.arrived

    def _match(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method != method or fault.path not in path:
                    continue
                fault.seen += 1
                if fault.seen > fault.after and fault.matched < fault.count:
                    fault.matched += 1
                    return fault
        return None

    # -- serving -----------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._release = asyncio.Event()
        self._stopping = asyncio.Event()
        async with aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None)
        ) as session:
            app = web.Application(client_max_size=1 << 30)

            async def forward(request: web.Request) -> web.StreamResponse:
                return await self._forward(request, session)

            app.router.add_route("*", "/{tail:.*}", forward)
            runner = web.AppRunner(app, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", self.port)
            await site.start()
            self._ready.set()
            await self._stopping.wait()
            self._release.set()
            await runner.cleanup()

    async def _forward(
        self, request: web.Request, session: aiohttp.ClientSession
    ) -> web.StreamResponse:
        assert self._release is not None
        path = request.path_qs
        self.requests.append((request.method, path))
        if time.monotonic() < self._refuse_until:
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=503)
        fault = self._match(request.method, path)
        body = await request.read()
        if fault is not None and fault.kind == "reject":
            fault.arrived.set()
            return web.json_response(
                {"error_code": "INTERNAL_ERROR", "message": "rejected by the fault proxy"},
                status=self._reject_status,
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with session.request(
            request.method, self.target + path, headers=headers, data=body,
            allow_redirects=False,
        ) as upstream:  # fmt: skip
            if fault is not None:
                fault.arrived.set()
                if fault.kind == "hold":
                    await self._release.wait()
                if request.transport is not None:
                    request.transport.abort()  # the answer is lost
                return web.Response(status=502)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_HEADERS:
                    response.headers[key] = value
            if upstream.headers.get("Content-Encoding"):
                response.headers["Content-Encoding"] = upstream.headers["Content-Encoding"]
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
