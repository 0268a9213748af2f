"""Reading an MLproject's YAML without trusting it: its size and nesting checked before
a loader builds it, parsed once per distinct text, and schema errors that name the
file, the line and the key."""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Sequence

import yaml

from aioproj.errors import MLprojectError

__all__ = [
    "MAX_MLPROJECT_BYTES",
    "MAX_MLPROJECT_NESTING",
    "Document",
    "NamedText",
    "check_nesting",
    "check_size",
    "is_scalar",
    "kind_of",
    "parse_yaml",
]


@functools.lru_cache(maxsize=256)
def parse_yaml(text: str, path: str) -> object:
    """The YAML data of an MLproject text, parsed once per distinct text.

    A sweep runs one project hundreds of times; the data is only read, never mutated.

    Raises:
        MLprojectError: the text is over the size limit or nests too deeply.
        yaml.YAMLError: the text is not YAML.
    """
    check_size(len(text.encode("utf-8", "surrogatepass")), path)
    check_nesting(text, path)
    return yaml.load(NamedText(text, path), Loader=_SafeLoader)


def check_size(size: int, path: str) -> None:
    if size > MAX_MLPROJECT_BYTES:
        raise MLprojectError(
            f"the MLproject file is larger than {MAX_MLPROJECT_BYTES} bytes; an MLproject "
            "declares entry points and an environment, data belongs in other files",
            path=path,
        )


def check_nesting(text: str, path: str) -> None:
    """Refuse YAML nested deeper than :data:`MAX_MLPROJECT_NESTING`, in linear time.

    Flow brackets are counted first without parsing (an over-count from brackets inside
    strings only matters past the limit), then the event stream, which libyaml produces
    without recursion, gives the true depth of block collections.
    """
    depth = 0
    for match in _BRACKETS.finditer(text):
        depth = depth + 1 if match.group() in _OPENING else max(depth - 1, 0)
        if depth > MAX_MLPROJECT_NESTING:
            break
    else:
        depth = 0
        try:
            for event in yaml.parse(text, Loader=_SafeLoader):
                if isinstance(event, _DEPTH_EVENTS):
                    depth += 1
                    if depth > MAX_MLPROJECT_NESTING:
                        break
                elif isinstance(event, _END_EVENTS):
                    depth -= 1
            else:
                return
        except yaml.YAMLError:
            return  # the loader reports it, with its line
    raise MLprojectError(f"the YAML nests deeper than {MAX_MLPROJECT_NESTING} levels", path=path)


class Document:
    """The MLproject text, able to turn a key path into an error with its line."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path

    def load(self) -> dict[str, object]:
        """Parse the text.

        Raises:
            MLprojectError: YAML syntax error (with its line), empty text, non-mapping top.
        """
        try:
            data = parse_yaml(self.text, self.path)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise MLprojectError(f"invalid YAML: {exc}", path=self.path, line=line) from None
        if data is None:
            raise MLprojectError("the MLproject file is empty", path=self.path)
        if not isinstance(data, dict):
            raise MLprojectError(
                f"the MLproject file must be a mapping, got {kind_of(data)}", path=self.path, line=1
            )
        return {str(key): value for key, value in data.items()}

    def error(self, keys: Sequence[str], message: str) -> MLprojectError:
        """An :class:`MLprojectError` for the key path ``keys``, with that key's line."""
        where = ".".join(keys)
        return MLprojectError(f"{where}: {message}", path=self.path, line=self.line_of(keys))

    def line_of(self, keys: Sequence[str]) -> int | None:
        """The 1-based line of the deepest key of ``keys`` present in the text."""
        try:
            node = yaml.compose(self.text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            return None
        line: int | None = None
        for key in keys:
            if not isinstance(node, yaml.MappingNode):
                break
            found = next(
                (
                    (k, v)
                    for k, v in node.value
                    if isinstance(k, yaml.ScalarNode) and k.value == key
                ),
                None,
            )
            if found is None:
                break
            line = found[0].start_mark.line + 1
            node = found[1]
        return line


class NamedText(io.StringIO):
    """YAML input whose problem marks name the MLproject file instead of ``<unicode string>``."""

    def __init__(self, text: str, name: str) -> None:
        super().__init__(text)
        self.name = name


def kind_of(value: object) -> str:
    """A short description of a YAML value's kind, for error messages."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


def is_scalar(value: object) -> bool:
    return isinstance(value, (str, int, float, bool))


#: libyaml's loader when PyYAML was built with it: parsing is then ~10x cheaper.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_BRACKETS = re.compile(r"[\[\]{}]")
_OPENING = frozenset("[{")
_DEPTH_EVENTS = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_END_EVENTS = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


#: Real MLproject files are a few hundred bytes; one this large is a mistake or an attack.
MAX_MLPROJECT_BYTES = 1 << 20
#: Deeper YAML nesting is refused before a loader builds it: libyaml recurses on the C
#: stack (a few hundred thousand ``[`` crash the process) and scans flow nesting in
#: quadratic time. Real files nest five or six levels.
MAX_MLPROJECT_NESTING = 100
