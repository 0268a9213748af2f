"""The public namespace is flat, sorted and complete."""

from __future__ import annotations

import subprocess
import sys
import types

import aioproj


def test_all_is_sorted_and_complete() -> None:
    public = {
        name
        for name in dir(aioproj)
        if not name.startswith("_") and not isinstance(getattr(aioproj, name), types.ModuleType)
    }
    public.discard("annotations")  # from __future__
    assert aioproj.__all__ == sorted(aioproj.__all__)
    assert set(aioproj.__all__) == public


def test_exported_objects_say_they_are_aioproj() -> None:
    for name in aioproj.__all__:
        obj = getattr(aioproj, name)
        if hasattr(obj, "__module__"):
            assert obj.__module__ == "aioproj", name


def test_every_error_derives_from_aioproj_error() -> None:
    for name in aioproj.__all__:
        obj = getattr(aioproj, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, aioproj.AioprojError), name


def test_run_failed_error_reads_like_mlflow() -> None:
    error = aioproj.RunFailedError("abc123", "FAILED")
    assert str(error) == "Run (ID 'abc123') failed"
    assert isinstance(error, aioproj.ExecutionError)


def test_import_does_not_load_optional_heavy_parts() -> None:
    code = (
        "import sys, aioproj; "
        "heavy = [m for m in ('mlflow', 'kubernetes_asyncio', 'dulwich', 'httpx', 'yaml', "
        "'aioproj.runner') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_lazy_names_load_on_first_use() -> None:
    code = "import aioproj; r = aioproj.Runner; print(r.__module__, aioproj.run.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["aioproj", "aioproj"]
