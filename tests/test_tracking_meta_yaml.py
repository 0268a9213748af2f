"""meta.yaml files: our fast writer and reader agree with PyYAML on every value."""

from __future__ import annotations

import random
import string
from typing import Any

import pytest
import yaml

from aioproj.tracking.mlruns import dump_yaml, load_yaml_text

TRICKY = [
    "",
    " ",
    "Default",
    "file:///tmp/mlruns/0",
    "a: b",
    "a:",
    "-x",
    "x-",
    "null",
    "Null",
    "NULL",
    "~",
    "true",
    "False",
    "yes",
    "No",
    "on",
    "OFF",
    "y",
    "n",
    "1",
    "-1",
    "01",
    "1.5",
    "1e3",
    ".inf",
    "0x1F",
    "12:30",
    "it's",
    "'quoted'",
    '"double"',
    "tab\there",
    "new\nline",
    "ünïcødé",
    "emoji 🎉",
    "#comment",
    "a #b",
    "[list]",
    "{map}",
    "*alias",
    "&anchor",
    "!tag",
    "%percent",
    "@at",
    "`tick`",
    "back\\slash",
    "x" * 200,
    "two  spaces",
    "trailing ",
    "\u2028sep",
    "\x00nul",
    "\x85nel",
]


def _sample(rng: random.Random) -> str:
    alphabet = string.printable + "üé🎉\u2028"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))


def _meta(value: Any) -> dict[str, Any]:
    return {
        "artifact_uri": "file:///tmp/mlruns/1/abc/artifacts",
        "end_time": None,
        "run_name": value,
        "status": 3,
        "tags": [],
        "start_time": 1795437794894,
    }


@pytest.mark.parametrize("value", TRICKY)
def test_written_meta_reads_back_identically_with_pyyaml_and_with_us(value: str) -> None:
    text = dump_yaml(_meta(value))
    assert yaml.safe_load(text) == _meta(value)
    assert load_yaml_text(text) == _meta(value)


def test_random_values_round_trip() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        value = _sample(rng)
        text = dump_yaml(_meta(value))
        assert yaml.safe_load(text) == _meta(value), value
        assert load_yaml_text(text) == _meta(value), value


@pytest.mark.parametrize("value", TRICKY)
def test_files_written_by_pyyaml_read_identically(value: str) -> None:
    text = yaml.safe_dump(_meta(value), default_flow_style=False)
    assert load_yaml_text(text) == yaml.safe_load(text)
