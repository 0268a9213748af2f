"""Real installs from the package index (network): a python_env project depending on
``six==1.16.0``, built with virtualenv and with uv, then run through the Runner."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

from aioproj import Runner
from aioproj.envs.cache import MARKER_NAME

from .support import amake_project

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CURRENT = f"{sys.version_info.major}.{sys.version_info.minor}"
MLPROJECT = """
name: indexdemo
python_env: python_env.yaml
entry_points:
  main:
    command: "python -c 'import sys, six; print(six.__version__, six.__file__, sys.prefix)'"
"""


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PIP_NO_INDEX", "UV_OFFLINE", "UV_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("manager", ["virtualenv", "uv"])
async def test_install_from_the_index_and_import_it(
    tmp_path: Path, tracking_uri: str, manager: str
) -> None:
    root = await amake_project(
        tmp_path / "p",
        MLPROJECT,
        {"python_env.yaml": f'python: "{CURRENT}"\ndependencies:\n  - six==1.16.0\n'},
    )
    async with Runner(cache_dir=tmp_path / "cache", echo="off") as runner:
        run = await runner.run(str(root), env_manager=manager)  # raises if it fails
        lines = [line async for line in run.logs()]
    version, module_file, prefix = lines[-1].split()
    assert version == "1.16.0"
    env_dir = Path(prefix)
    assert env_dir.parent == tmp_path / "cache" / "envs"
    assert env_dir.name.startswith(f"{manager}-")
    assert Path(module_file).is_relative_to(env_dir)
    assert await anyio.Path(env_dir / MARKER_NAME).exists()
