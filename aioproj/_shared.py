"""Single-flight: concurrent identical calls share one call's result.

A sweep starts hundreds of runs of one project at once: they fetch the same source, parse
the same MLproject and look up the same experiment. Sharing the call that is already in
flight turns those hundreds into one, without caching anything once it is done (a later
call sees the project as it is then).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import anyio

__all__ = ["SharedCalls"]

T = TypeVar("T")


@dataclass
class _Flight:
    done: anyio.Event = field(default_factory=anyio.Event)
    ok: bool = False
    value: Any = None


class SharedCalls:
    """Concurrent callers with the same key share the result of one in-flight call.

    Only a result is shared: when the leading call fails or is cancelled, each waiting
    caller makes its own call, so one exception is never raised in several tasks.
    """

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}

    async def run(self, key: str, call: Callable[[], Awaitable[T]]) -> T:
        """The result of ``call()``, or of the identical call already in flight."""
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            return cast(T, flight.value) if flight.ok else await call()
        flight = self._flights[key] = _Flight()
        try:
            flight.value = await call()
            flight.ok = True
            return cast(T, flight.value)
        finally:
            del self._flights[key]
            flight.done.set()
