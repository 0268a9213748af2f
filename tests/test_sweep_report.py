"""The sweep report: one self-contained HTML file, checked in a real headless browser
(Debian's chromium, installed by a fixture when missing): it loads with the network
off, draws a curve per trial that logged the metric and a line per trial across the
parameter axes, and names the best trial."""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import aioproj
from aioproj.sweeps.records import load_sweep
from aioproj.sweeps.report import report_data
from aioproj.tracking import open_store

from .support import amake_project, unavailable

# loss = quality / (step + 1) for `steps` steps, written into the file store; a quality
# of 0 fails before logging anything.
TRAIN_PY = """\
import os, sys, time, urllib.parse

quality, kind, steps = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if quality == 0:
    sys.exit("ValueError: quality must be positive")
root = urllib.parse.urlparse(os.environ["MLFLOW_TRACKING_URI"]).path
folder = os.path.join(
    root, os.environ["MLFLOW_EXPERIMENT_ID"], os.environ["MLFLOW_RUN_ID"], "metrics"
)
for step in range(steps):
    with open(os.path.join(folder, "loss"), "a") as f:
        f.write(f"{int(time.time() * 1000)} {quality / (step + 1)} {step}\\n")
"""

MLPROJECT = """
entry_points:
  main:
    parameters:
      quality: float
      kind: {type: string, default: plain}
      steps: {type: int, default: 8}
    command: "python train.py {quality} {kind} {steps}"
"""

HOSTILE = "</script><img id=injected src=x onerror=alert(1)>"

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _install_chromium() -> str | None:
    """Debian's chromium, installed with apt-get when missing; None if that fails."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]  # another test process may be installing too
    for command in (
        ["apt-get", *lock, "update"],
        ["apt-get", *lock, "install", "-y", "-q", "chromium"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return None
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def chromium() -> str:
    path = _install_chromium()
    if path is None:
        unavailable("chromium is not installed and apt-get could not install it")
    return path


def _browser(chromium: str, page: Path, profile: Path, *extra: str) -> str:
    done = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


class _Elements(html.parser.HTMLParser):
    """Every element of a document: (tag, attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


def _elements(document: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Elements()
    parser.feed(document)
    return parser.found


@pytest.fixture
async def sweep_run(tmp_path: Path, tracking_uri: str) -> aioproj.Sweep:
    project = await amake_project(tmp_path / "proj", MLPROJECT, {"train.py": TRAIN_PY})
    sweep = aioproj.sweep(
        str(project),
        [
            {"quality": 1.0, "kind": "plain"},
            {"quality": 2.0, "kind": "fancy"},
            {"quality": 0.5, "kind": HOSTILE},
            {"quality": 0.0, "kind": "plain"},  # fails before it logs
            {"quality": 1.5, "kind": "fancy", "steps": 3},
        ],
        metric="loss",
        max_parallel=5,
        env_manager="local",
        name="report-demo",
    )
    results = await sweep
    assert sorted(r.status.value for r in results) == ["FAILED"] + ["FINISHED"] * 4
    return sweep


@pytest.mark.anyio
async def test_report_data_from_tracking(sweep_run: aioproj.Sweep, tracking_uri: str) -> None:
    assert sweep_run.parent_run_id is not None
    store = await anyio.to_thread.run_sync(open_store, tracking_uri)
    record = await load_sweep(store, sweep_run.parent_run_id)
    data = report_data(record)
    assert data["metric"] == "loss"
    assert data["best"] == 2  # quality 0.5
    by_index = {t["index"]: t for t in data["trials"]}
    assert by_index[0]["curve"] == [[s, 1.0 / (s + 1)] for s in range(8)]
    assert by_index[3]["curve"] == []
    assert by_index[3]["status"] == "FAILED"
    assert "quality must be positive" in by_index[3]["reason"]
    assert by_index[4]["value"] == 0.5
    assert by_index[2]["params"]["kind"] == HOSTILE


@pytest.mark.anyio
async def test_report_opens_in_a_headless_browser(
    sweep_run: aioproj.Sweep, tmp_path: Path, tracking_uri: str, chromium: str
) -> None:
    page = tmp_path / "sweep.html"
    await sweep_run.write_report(page)
    text = await anyio.Path(page).read_text()
    # Self-contained: no script, style or image from elsewhere, and the hostile value
    # is data, not markup.
    for tag, attrs in _elements(text):
        for name in ("src", "href"):
            assert not (attrs.get(name) or "").startswith(("http:", "https:", "//")), tag
    assert HOSTILE not in text

    # The CLI writes the same report.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    cli_page = tmp_path / "cli.html"
    done = await anyio.run_process(
        [sys.executable, "-m", "aioproj", "report", str(sweep_run.parent_run_id), "-o",
         str(cli_page)],
        env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert await anyio.Path(cli_page).read_text() == text

    dom = await anyio.to_thread.run_sync(
        _browser, chromium, page, tmp_path / "profile", "--dump-dom"
    )
    elements = _elements(dom)
    body = next(attrs for tag, attrs in elements if tag == "body")
    assert body.get("data-plotted-trials") == "4"  # the failed trial logged nothing
    # every trial has its parameters on the axes, the failed one without a metric
    assert body.get("data-parallel-trials") == "5"
    polylines = [attrs for tag, attrs in elements if tag == "polyline"]
    curves = [attrs for attrs in polylines if attrs.get("class") == "curve"]
    assert sorted(int(a["data-trial"] or -1) for a in curves) == [0, 1, 2, 4]
    best = next(a for a in curves if a["data-trial"] == "2")
    assert best["stroke-width"] == "3"  # the best trial stands out
    assert not [a for tag, a in elements if tag == "img"]  # nothing injected
    assert re.search(r"Best: trial 2, loss=0\.0625", dom)
    assert re.search(r'id="plotted-trials">4<', dom)

    shot = tmp_path / "sweep-report.png"
    await anyio.to_thread.run_sync(
        _browser, chromium, page, tmp_path / "profile2", f"--screenshot={shot}",
        "--window-size=1000,1400", "--hide-scrollbars",
    )  # fmt: skip
    assert (await anyio.Path(shot).stat()).st_size > 10_000
    kept = Path(os.environ.get("AIOPROJ_REPORT_SCREENSHOT_DIR", tmp_path)) / shot.name
    if kept != shot:
        await anyio.to_thread.run_sync(shutil.copy, shot, kept)
    print(f"report screenshot: {kept}")


def test_report_of_what_is_not_a_sweep(tmp_path: Path) -> None:
    (tmp_path / "mlruns").mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()}
    done = subprocess.run(
        [sys.executable, "-m", "aioproj", "report", "0123abcd", "-o", str(tmp_path / "x.html")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "not found" in done.stderr
    assert not (tmp_path / "x.html").exists()
