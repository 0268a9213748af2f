"""The sweep report: one self-contained HTML file to look at, not read.

It shows the ranking metric against step for every trial, the parameters against the
metric (parallel coordinates: one axis per parameter, the metric last), the best trial
and a table of every trial with why those that did not finish stopped. The data go in
as JSON; a small inline script draws SVG from it, so the file needs no network, no CDN
and nothing installed: any browser opens it, offline. :func:`render_report` is pure;
:func:`write_sweep_report` reads the sweep back from tracking and writes the file.
"""

from __future__ import annotations

import html
import json
import math
import os
from typing import Any

import anyio
import anyio.to_thread

from aioproj._redact import redact_url
from aioproj.sweeps.records import SweepRecord, TrialRecord, load_sweep

__all__ = ["render_report", "report_data", "write_sweep_report"]


async def write_sweep_report(
    tracking_uri: str,
    parent_run_id: str,
    path: str | os.PathLike[str],
    *,
    metric: str | None = None,
) -> None:
    """Write the report of the sweep whose parent run is ``parent_run_id``.

    ``metric``: what to plot; default the sweep's own, else the first metric its trials
    logged.

    Raises:
        InvalidArgumentError: a malformed id, or a run that is not a sweep's parent.
        TrackingError: no such run, or the store cannot be read.
        OSError: the file cannot be written.
    """
    from aioproj.tracking import open_store

    store = await anyio.to_thread.run_sync(open_store, tracking_uri)
    try:
        record = await load_sweep(store, parent_run_id)
    finally:
        await store.aclose()
    await anyio.Path(path).write_text(render_report(record, metric=metric), encoding="utf-8")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _plain(value: Any) -> Any:
    """A parameter value as JSON takes it."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def report_data(record: SweepRecord, metric: str | None = None) -> dict[str, Any]:
    """What the report shows, as JSON-ready data; pure."""
    metric = metric or record.metric or _first_metric(record.trials)
    goal = record.goal
    trials: list[dict[str, Any]] = []
    for trial in record.trials:
        curve = trial.history.get(metric, {}) if metric else {}
        trials.append(
            {
                "index": trial.index,
                "status": trial.status,
                "pruned": trial.pruned is not None,
                "run_id": trial.run.run_id,
                "params": {k: _plain(v) for k, v in trial.params.items()},
                "value": _finite(trial.metrics.get(metric)) if metric else None,
                "curve": [[s, v] for s, v in sorted(curve.items()) if math.isfinite(v)],
                "duration": round(trial.duration, 3),
                "attempts": trial.attempts,
                "reason": trial.reason or "",
            }
        )
    scored = [t for t in trials if t["status"] == "FINISHED" and t["value"] is not None]
    pick = min if goal == "min" else max
    best = pick(scored, key=lambda t: t["value"])["index"] if scored else None
    parent = record.parent
    return {
        "parent_run_id": parent.run_id,
        "name": parent.run_name,
        "status": parent.status,
        "source": redact_url(parent.tags.get("mlflow.source.name", "")),
        "entry_point": parent.tags.get("mlflow.project.entryPoint", ""),
        "metric": metric,
        "goal": goal,
        "best": best,
        "trials": trials,
    }


def _first_metric(trials: list[TrialRecord] | Any) -> str | None:
    keys = sorted({key for trial in trials for key in trial.history})
    return keys[0] if keys else None


def render_report(record: SweepRecord, *, metric: str | None = None) -> str:
    """The report of a sweep as one HTML document; pure."""
    data = report_data(record, metric)
    # "<" escaped: no value (a parameter, a reason) can close the script element.
    payload = json.dumps(data, allow_nan=False).replace("<", "\\u003c")
    title = html.escape(f"Sweep {data['name'] or data['parent_run_id']}")
    page = _PAGE.replace("@STYLE@", _STYLE).replace("@SCRIPT@", _SCRIPT)
    return page.replace("@TITLE@", title).replace("@DATA@", payload)  # data last


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 6px; }
.meta { color: #555; } .best { background: #f3f7ee; padding: 8px 12px; border-radius: 6px; }
svg { background: #fff; border: 1px solid #ddd; }
svg text { font-size: 11px; fill: #444; }
table { border-collapse: collapse; margin-top: 6px; }
td, th { border-bottom: 1px solid #eee; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.FINISHED { color: #1b7f3b; } .FAILED { color: #c0392b; } .KILLED { color: #8e44ad; }
.legend span { margin-right: 14px; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>@TITLE@</title>
<style>@STYLE@</style>
</head>
<body>
<h1 id="title">@TITLE@</h1>
<div class="meta" id="meta"></div>
<p class="best" id="best"></p>
<h2 id="curves-title">Metric against step</h2>
<div class="legend" id="legend"></div>
<svg id="curves" width="900" height="380" role="img"></svg>
<h2 id="pc-title">Parameters against the metric</h2>
<svg id="parallel" width="900" height="380" role="img"></svg>
<h2>Trials (<span id="plotted-trials">0</span> plotted)</h2>
<table id="trials"></table>
<noscript>This report draws its plots with an inline script; enable JavaScript.</noscript>
<script type="application/json" id="sweep-data">@DATA@</script>
<script>@SCRIPT@</script>
</body>
</html>
"""

_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("sweep-data").textContent);
const NS = "http://www.w3.org/2000/svg";
const W = 900, H = 380, M = {l: 64, r: 20, t: 16, b: 40};

function el(tag, attrs, parent, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}
function fmt(v) {
  if (v === null || v === undefined) return "-";
  if (typeof v !== "number") return String(v);
  return Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3)
    : String(+v.toPrecision(6));
}
function scale(values, lo, hi) {
  let min = Math.min(...values), max = Math.max(...values);
  const log = min > 0 && max / min > 100;
  if (log) { min = Math.log10(min); max = Math.log10(max); }
  if (min === max) { min -= 0.5; max += 0.5; }
  const f = v => lo + ((log ? Math.log10(v) : v) - min) / (max - min) * (hi - lo);
  f.ticks = [0, 0.25, 0.5, 0.75, 1].map(q => {
    const x = min + q * (max - min);
    return log ? Math.pow(10, x) : x;
  });
  return f;
}
function label(t) {
  return "trial " + t.index + " " + t.status + (t.pruned ? " (pruned)" : "") + "\n" +
    Object.entries(t.params).map(([k, v]) => k + "=" + fmt(v)).join(" ") +
    "\n" + D.metric + "=" + fmt(t.value) + (t.reason ? "\n" + t.reason.split("\n").pop() : "");
}
const ranked = D.trials.filter(t => t.value !== null).map(t => t.value);
function color(t) {
  if (t.status === "FAILED") return "#c0392b";
  if (t.status !== "FINISHED") return t.pruned ? "#e67e22" : "#8e44ad";
  if (t.value === null || ranked.length < 2) return "#2471a3";
  const lo = Math.min(...ranked), hi = Math.max(...ranked);
  let q = hi === lo ? 0 : (t.value - lo) / (hi - lo);
  if (D.goal === "max") q = 1 - q;   // q = 0: the best end of the range
  return "hsl(" + Math.round(140 + 80 * q) + ", 60%, " + Math.round(32 + 20 * q) + "%)";
}

function curves() {
  const svg = document.getElementById("curves");
  const drawn = D.trials.filter(t => t.curve.length > 0);
  if (!drawn.length) {
    el("text", {x: 20, y: 30}, svg, "No trial logged " + (D.metric || "a metric") + ".");
    return 0;
  }
  const steps = drawn.flatMap(t => t.curve.map(p => p[0]));
  const values = drawn.flatMap(t => t.curve.map(p => p[1]));
  const x = scale(steps.map(s => s + 1), M.l, W - M.r);   // steps from 0: shifted for log
  const y = scale(values, H - M.b, M.t);
  el("line", {x1: M.l, y1: H - M.b, x2: W - M.r, y2: H - M.b, stroke: "#999"}, svg);
  el("line", {x1: M.l, y1: M.t, x2: M.l, y2: H - M.b, stroke: "#999"}, svg);
  for (const v of y.ticks) el("text", {x: M.l - 6, y: y(v) + 4, "text-anchor": "end"}, svg, fmt(v));
  for (const s of x.ticks) {
    el("text", {x: x(s), y: H - M.b + 16, "text-anchor": "middle"}, svg, fmt(Math.round(s - 1)));
  }
  el("text", {x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle"}, svg, "step");
  el("text", {x: 14, y: M.t + 10}, svg, D.metric);
  const order = drawn.slice().sort((a, b) => (a.index === D.best) - (b.index === D.best));
  for (const t of order) {
    const best = t.index === D.best;
    const points = t.curve.map(p => x(p[0] + 1).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
    const line = el("polyline", {
      points, fill: "none", class: "curve", "data-trial": t.index,
      stroke: best ? "#111" : color(t), "stroke-width": best ? 3 : 1.5,
      "stroke-dasharray": t.status === "FINISHED" ? "" : "5,3", opacity: best ? 1 : 0.8,
    }, svg);
    el("title", {}, line, label(t));
    if (t.curve.length === 1) {
      const [s, v] = t.curve[0];
      el("circle", {cx: x(s + 1), cy: y(v), r: 3, fill: color(t), class: "point"}, svg);
    }
  }
  return drawn.length;
}

function parallel() {
  const svg = document.getElementById("parallel");
  const names = [...new Set(D.trials.flatMap(t => Object.keys(t.params)))];
  const dims = names.map(n => ({name: n, get: t => t.params[n]}));
  dims.push({name: D.metric || "metric", get: t => t.value, metric: true});
  const step = (W - M.l - M.r) / Math.max(dims.length - 1, 1);
  for (const [i, d] of dims.entries()) {
    d.x = M.l + i * step;
    const vals = D.trials.map(d.get).filter(v => v !== null && v !== undefined);
    if (vals.length && vals.every(v => typeof v === "number")) {
      d.y = scale(vals, H - M.b, M.t);
      d.ticks = d.y.ticks;
    } else {
      const cats = [...new Set(vals.map(String))].sort();
      const frac = k => (cats.length > 1 ? k / (cats.length - 1) : 0.5);
      const at = new Map(cats.map((c, k) => [c, H - M.b - frac(k) * (H - M.b - M.t)]));
      d.y = v => at.get(String(v));
      d.ticks = cats;
    }
    el("line", {x1: d.x, y1: M.t, x2: d.x, y2: H - M.b, stroke: "#999"}, svg);
    const weight = d.metric ? "bold" : "normal";
    el("text", {x: d.x, y: H - M.b + 18, "text-anchor": "middle", "font-weight": weight}, svg,
      d.name);
    for (const v of d.ticks) el("text", {x: d.x + 4, y: d.y(v) + 4}, svg, fmt(v));
  }
  let n = 0;
  for (const t of D.trials) {
    const pts = dims.filter(d => d.get(t) !== null && d.get(t) !== undefined)
      .map(d => d.x.toFixed(1) + "," + d.y(d.get(t)).toFixed(1));
    if (pts.length < 2) continue;
    const best = t.index === D.best;
    const line = el("polyline", {
      points: pts.join(" "),
      fill: "none", class: "pc-line", "data-trial": t.index, stroke: best ? "#111" : color(t),
      "stroke-width": best ? 3 : 1.5, opacity: best ? 1 : 0.75,
    }, svg);
    el("title", {}, line, label(t));
    n += 1;
  }
  return n;
}

function tables() {
  const meta = document.getElementById("meta");
  meta.textContent = "Parent run " + D.parent_run_id + " · " + D.status + " · " + D.source +
    (D.entry_point ? " (" + D.entry_point + ")" : "") + " · " + D.trials.length + " trials · " +
    (D.metric ? D.metric + " (" + D.goal + ")" : "no metric");
  const best = D.trials.find(t => t.index === D.best);
  document.getElementById("best").textContent = best
    ? "Best: trial " + best.index + ", " + D.metric + "=" + fmt(best.value) + " with " +
      Object.entries(best.params).map(([k, v]) => k + "=" + fmt(v)).join(", ") +
      " (run " + best.run_id + ")"
    : "No trial finished with a value of " + (D.metric || "a metric") + ".";
  const legend = document.getElementById("legend");
  const keys = [["best", "#111"], ["finished: green the best, blue the worst", "hsl(140,60%,32%)"],
    ["pruned", "#e67e22"], ["failed", "#c0392b"], ["killed", "#8e44ad"]];
  for (const [text, c] of keys) {
    const span = document.createElement("span");
    span.style.color = c;
    span.textContent = "— " + text;
    legend.appendChild(span);
  }
  const table = document.getElementById("trials");
  const head = table.insertRow();
  for (const h of ["trial", "status", D.metric || "metric", "parameters", "time", "run", "why"]) {
    const th = document.createElement("th");
    th.textContent = h;
    head.appendChild(th);
  }
  for (const t of D.trials) {
    const row = table.insertRow();
    row.dataset.trial = t.index;
    const cells = [t.index, t.status + (t.pruned ? " (pruned)" : ""), fmt(t.value),
      Object.entries(t.params).map(([k, v]) => k + "=" + fmt(v)).join(" "), fmt(t.duration) + "s",
      t.run_id.slice(0, 12), t.reason.split("\n").pop()];
    cells.forEach((c, k) => {
      const cell = row.insertCell();
      cell.textContent = String(c);
      if (k === 0 || k === 2 || k === 4) cell.className = "num";
      if (k === 1) cell.className = t.status;
    });
  }
}

tables();
const plotted = curves();
const lines = parallel();
document.getElementById("plotted-trials").textContent = String(plotted);
document.body.dataset.plottedTrials = String(plotted);
document.body.dataset.parallelTrials = String(lines);
"""
