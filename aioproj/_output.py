"""A run's output: split into lines, echoed to the caller, replayed by ``run.logs()``.

Backends push raw bytes with :meth:`RunOutput.feed`; everything else is theirs to ignore.
Lines are kept in memory (up to ``max_bytes``; past that, the middle of the log is dropped
and a marker line says how much) and saved as the run artifact ``aioproj/output.log``
when the run ends.
"""

from __future__ import annotations

import sys
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
        self._max_bytes = max_bytes
        self._lines: list[str] = []
        self._kept_bytes = 0
        self._dropped_lines = 0
        self._partial = b""
        self._closed = False
        self._changed = anyio.Event()

    def feed(self, data: bytes) -> None:
        """Add raw output. Incomplete trailing lines wait for the next chunk."""
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        if complete:
            self._add([line.decode("utf-8", "replace") + "\n" for line in complete])

    def _add(self, lines: list[str]) -> None:
        if self._echo != "off":
            stream = self._stream or sys.stdout
            if self._echo == "labelled":
                prefix = f"[{self.label}] "
                stream.write("".join(prefix + line for line in lines))
            else:
                stream.write("".join(lines))
            stream.flush()
        for line in lines:
            if self._kept_bytes < self._max_bytes:
                self._lines.append(line)
                self._kept_bytes += len(line)
            else:
                self._dropped_lines += 1
        self._changed.set()
        self._changed = anyio.Event()

    def close(self) -> None:
        """Mark the output complete: flush a partial last line, end ``lines()`` iterators."""
        if self._closed:
            return
        if self._partial:
            partial, self._partial = self._partial, b""
            self._add([partial.decode("utf-8", "replace") + "\n"])
        if self._dropped_lines:
            self._lines.append(
                f"[aioproj: {self._dropped_lines} further lines were not kept in memory]\n"
            )
        self._closed = True
        self._changed.set()

    async def aclose(self, store: TrackingStore, run_id: str) -> None:
        """Close, then save the output as the run artifact :data:`ARTIFACT_PATH`."""
        self.close()
        if self._lines:
            data = "".join(self._lines).encode("utf-8")
            await store.log_artifact_bytes(run_id, ARTIFACT_PATH, data)

    async def lines(self) -> AsyncIterator[str]:
        """Yield every line from the first, then new ones as they come, until closed."""
        index = 0
        while True:
            while index < len(self._lines):
                yield self._lines[index]
                index += 1
            if self._closed:
                return
            await self._changed.wait()
