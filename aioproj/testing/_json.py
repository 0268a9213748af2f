"""Request bodies as the emulators read them: JSON that a hostile client cannot turn into a
500 or a crash.

A real API server answers a body it cannot take with a 400 (malformed, nested too deep)
or a 413 (too large, which aiohttp's ``client_max_size`` answers before this runs). The
emulators' handlers copy, merge and serialise bodies recursively, so a body nested a few
hundred levels deep would exhaust the recursion limit there: it is refused here, before a
handler sees it.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "JsonBodyError", "loads_bounded"]

#: Deeper JSON is refused. Real request bodies nest ten or twenty levels; the handlers
#: recurse a few frames per level, well inside Python's recursion limit at this depth.
MAX_JSON_DEPTH = 100


class JsonBodyError(ValueError):
    """A body that is not JSON, or nests deeper than :data:`MAX_JSON_DEPTH`."""


def loads_bounded(raw: bytes | str) -> Any:
    """Parse a JSON body, refusing one nested deeper than :data:`MAX_JSON_DEPTH`.

    Linear in the size of the body; never raises RecursionError.

    Raises:
        JsonBodyError: the body is not JSON (or not UTF-8), or nests too deep.
    """
    try:
        value = json.loads(raw)
    except RecursionError:  # the C scanner's own limit: far deeper than ours
        raise JsonBodyError(f"the JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonBodyError(f"the body is not valid JSON: {exc}") from None
    _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    """Walk ``value`` without recursion; JsonBodyError past :data:`MAX_JSON_DEPTH`."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise JsonBodyError(f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)
