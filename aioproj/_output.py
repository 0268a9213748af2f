"""A run's output: split into lines, echoed to the caller, replayed by ``run.logs()``.

Backends push raw bytes with :meth:`RunOutput.feed`; everything else is theirs to ignore.
Lines are kept in memory up to ``max_bytes``: the first half of that budget keeps the
start of the log, the second half its latest lines (where a failure's traceback is), and
a marker line says how many lines in between were dropped. The log is saved as the run
artifact ``aioproj/output.log`` when the run ends.

Echoed lines are written by one writer thread shared by all runs, so a terminal or pipe
that reads slowly (``aioproj ... | less``) never stalls the event loop.
"""

from __future__ import annotations

import collections
import queue
import sys
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Literal, TextIO

import anyio

if TYPE_CHECKING:
    from aioproj.tracking.base import TrackingStore

__all__ = ["ARTIFACT_PATH", "EchoMode", "RunOutput"]

EchoMode = Literal["labelled", "plain", "off"]

#: Where the output of a run is saved among its artifacts.
ARTIFACT_PATH = "aioproj/output.log"

_DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: A "line" that never ends (a progress bar redrawn with \r) is cut at this length.
_MAX_LINE_BYTES = 64 * 1024


class _EchoWriter:
    """One daemon thread that writes echoed output, in order, for every run."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[TextIO, str] | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def write(self, stream: TextIO, text: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="aioproj-echo", daemon=True)
            self._thread.start()
        self._queue.put((stream, text))

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            stream, text = item
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):  # closed or broken stdout: nothing to echo to
                pass

    async def drain(self) -> None:
        """Wait until everything queued so far has been written."""
        if self._thread is None:
            return
        written = threading.Event()
        self._queue.put(written)
        await anyio.to_thread.run_sync(written.wait)


_echo = _EchoWriter()


class RunOutput:
    """The output of one run."""

    def __init__(
        self,
        label: str,
        *,
        echo: EchoMode = "labelled",
        stream: TextIO | None = None,
        max_bytes: int = _DEFAULT_MAX_BYTES,
    ) -> None:
        self.label = label
        self._echo = echo
        self._stream = stream
        self._budget = max_bytes // 2  # for the head, and again for the tail
        self._head: list[str] = []
        self._head_bytes = 0
        self._tail: collections.deque[str] = collections.deque()
        self._tail_bytes = 0
        self._tail_start = 0  # number of the first line in the tail
        self._count = 0  # lines added so far
        self._partial = bytearray()
        self._closed = False
        self._changed = anyio.Event()

    def feed(self, data: bytes) -> None:
        """Add raw output. Incomplete trailing lines wait for the next chunk."""
        end = data.rfind(b"\n")
        if end < 0:
            self._partial += data
            if len(self._partial) > _MAX_LINE_BYTES:
                self._take_partial()
            return
        chunk = bytes(self._partial) + data[: end + 1] if self._partial else data[: end + 1]
        self._partial = bytearray(data[end + 1 :])
        self._add([line.decode("utf-8", "replace") + "\n" for line in chunk.split(b"\n")[:-1]])

    def _take_partial(self) -> None:
        partial, self._partial = bytes(self._partial), bytearray()
        self._add([partial.decode("utf-8", "replace") + "\n"])

    def _add(self, lines: list[str]) -> None:
        if self._echo != "off":
            stream = self._stream or sys.stdout
            if self._echo == "labelled":
                prefix = f"[{self.label}] "
                _echo.write(stream, "".join(prefix + line for line in lines))
            else:
                _echo.write(stream, "".join(lines))
        for line in lines:
            self._keep(line)
        self._changed.set()
        self._changed = anyio.Event()

    def _keep(self, line: str) -> None:
        self._count += 1
        if not self._tail and self._head_bytes < self._budget:
            self._head.append(line)
            self._head_bytes += len(line)
            self._tail_start = self._count
            return
        self._tail.append(line)
        self._tail_bytes += len(line)
        while self._tail_bytes > self._budget and len(self._tail) > 1:
            self._tail_bytes -= len(self._tail.popleft())
            self._tail_start += 1

    @property
    def dropped(self) -> int:
        """How many lines between the kept head and tail were dropped."""
        return self._tail_start - len(self._head)

    def close(self) -> None:
        """Mark the output complete: flush a partial last line, end ``lines()`` iterators."""
        if self._closed:
            return
        if self._partial:
            self._take_partial()
        self._closed = True
        self._changed.set()

    def text(self) -> str:
        """The whole kept log, with a marker where lines were dropped."""
        marker = [f"[aioproj: {self.dropped} lines dropped here]\n"] if self.dropped else []
        return "".join([*self._head, *marker, *self._tail])

    async def aclose(self, store: TrackingStore, run_id: str) -> None:
        """Close, wait for the echo to catch up, save the log as :data:`ARTIFACT_PATH`."""
        self.close()
        if self._echo != "off":
            await _echo.drain()
        if self._count:
            await store.log_artifact_bytes(run_id, ARTIFACT_PATH, self.text().encode("utf-8"))

    async def lines(self) -> AsyncIterator[str]:
        """Yield every kept line from the first, then new ones as they come, until closed.

        A reader that falls behind by more than the memory budget gets a marker line
        saying how many lines it missed, then continues with the oldest line still kept.
        """
        number = 0
        while True:
            while number < self._count:
                if number < len(self._head):
                    yield self._head[number]
                    number += 1
                elif number < self._tail_start:
                    yield f"[aioproj: {self._tail_start - number} lines dropped here]\n"
                    number = self._tail_start
                else:
                    yield self._tail[number - self._tail_start]
                    number += 1
            if self._closed:
                return
            await self._changed.wait()
