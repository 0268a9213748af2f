"""Install the test MLflow backend plugin (tests/mlflow_plugin/) for real: a wheel with an
``mlflow.project_backend`` entry point, built here (no build backend needed, so it works
on any Python) and installed with pip into the environment running the tests.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

PLUGIN_NAME = "aioproj-test-shell"
DISTRIBUTION = "aioproj-test-mlflow-plugin"
MODULE = "aioproj_test_mlflow_plugin"
_VERSION = "1.0"
_SOURCE = Path(__file__).with_name("mlflow_plugin") / f"{MODULE}.py"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(out_dir: Path) -> Path:
    """Write the plugin's wheel into ``out_dir`` and return its path."""
    dist_info = f"{MODULE}-{_VERSION}.dist-info"
    files = {
        f"{MODULE}.py": _SOURCE.read_bytes(),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: {_VERSION}\n"
            "Summary: An MLflow project backend plugin for aioproj's tests\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: aioproj-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
        f"{dist_info}/entry_points.txt": (
            f"[mlflow.project_backend]\n{PLUGIN_NAME} = {MODULE}:ShellBackend\n"
        ).encode(),
    }
    record = [_record_line(name, data) for name, data in files.items()]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out_dir / f"{MODULE}-{_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


def _pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def install(out_dir: Path) -> None:
    """Build the wheel and pip-install it into the running interpreter's environment."""
    wheel = build_wheel(out_dir)
    _pip("install", "--no-deps", "--no-index", "--force-reinstall", str(wheel))
    importlib.invalidate_caches()


def uninstall() -> None:
    """Remove the plugin again (pip uninstall)."""
    _pip("uninstall", "-y", DISTRIBUTION)
    sys.modules.pop(MODULE, None)
    importlib.invalidate_caches()
