"""The peers comparison's verdicts and table, from a bench/peers result (python -m bench.peers writes it; bench.run_all
reads it). Standard library only.
"""

from __future__ import annotations

import math
from typing import Any

FRAMEWORKS = ("litserve", "bentoml", "rayserve")  # the peer frameworks; flask is the bare floor, not one of them
FLOOR = "flask"
CLIENTS = (1, 4, 16)
NOT_SET_UP = "not set up: run python -m bench.peers --setup"
METHOD = ("one load generator (bench/load.py: threads with keep-alive sessions) sends the same 16 generated 320x240 "
          "JPEGs as raw image/jpeg bodies to each server's /predict on 127.0.0.1; every server runs the same "
          "random-weight smallcnn export with the same decode, preprocessing and ONNX Runtime call, 2 worker "
          "processes, ONNX Runtime threads = cores / workers, each framework otherwise at its defaults; peak RSS = "
          "the largest sum of RSS over the server's whole process tree while the point ran (psutil, every 50 ms; "
          "forked workers' shared pages count in each); server CPU = the user + system seconds of that tree over "
          "the requests answered; the servers run in interleaved rounds and each is reported "
          "from its quieter round (the lower mean 1-minute load average before its points)")


def choose(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server, its quieter round: {"rows": [... with "server", "round"], "chosen": {server: round}}."""
    best: dict[str, dict[str, Any]] = {}
    for run in runs:
        if "rows" not in run:
            continue
        load = sum(r["load_average"] for r in run["rows"]) / len(run["rows"])
        if run["server"] not in best or load < best[run["server"]]["load"]:
            best[run["server"]] = {"load": load, "run": run}
    rows = [{"server": s, "round": b["run"]["round"], **r} for s, b in best.items() for r in b["run"]["rows"]]
    return {"rows": rows, "chosen": {s: b["run"]["round"] for s, b in best.items()}}


def _row(rows: list[dict[str, Any]], server: str, clients: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["server"] == server and r["clients"] == clients), None)


def _peak(rows: list[dict[str, Any]], server: str) -> float:
    return max((r["peak_rss_mb"] for r in rows if r["server"] == server), default=math.nan)


def best_framework(rows: list[dict[str, Any]]) -> str | None:
    """The peer framework with the most requests/s summed over the client counts."""
    rates = {f: sum(r["req_s"] for r in rows if r["server"] == f) for f in FRAMEWORKS}
    rates = {f: v for f, v in rates.items() if v > 0}
    return max(rates, key=rates.get) if rates else None


def _check(target: str, bar: str, measured: float, met: bool | None, short: str | None, note: str | None = None):
    return {"target": target, "bar": bar, "measured": measured, "met": met, "short_by": short, "note": note}


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float:
    return a["req_s"] / b["req_s"] if a and b and b["req_s"] > 0 else math.nan


def targets(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """torchferry ≥ the best peer framework's req/s at 1/4/16 clients, ≤ 0.5× its peak RSS, ≥ 0.97× bare Flask."""
    rows = (result or {}).get("rows", [])
    note = NOT_SET_UP if result and result.get("not_set_up") else None
    best = best_framework(rows)
    name = f"the best peer framework ({best})" if best else "the best peer framework"
    checks = []
    for n in CLIENTS:
        value = _ratio(_row(rows, "torchferry", n), _row(rows, best, n) if best else None)
        met = None if math.isnan(value) else value >= 1.0
        checks.append(_check(f"torchferry req/s vs {name}, {n} client(s) (smallcnn, 2 workers)", ">= 1x", value, met,
                             None if met in (None, True) else f"short by {100 * (1 - value):.1f} %", note))
    value = _peak(rows, "torchferry") / _peak(rows, best) if best else math.nan
    met = None if math.isnan(value) else value <= 0.5
    checks.append(_check(f"torchferry peak RSS vs {name} (process trees, 2 workers)", "<= 0.5x", value, met,
                         None if met in (None, True) else f"{value - 0.5:.2f}x over", note))
    pairs = ((result or {}).get("paired") or {}).get("by_clients") or {}
    for n in CLIENTS:
        # Both running at once, the load alternating between them (paired), when measured: a few per cent between
        # two servers is lost in what separates two rounds minutes apart (0.65-1.17x in a day's single rounds).
        value = pairs[str(n)]["median_ratio"] if str(n) in pairs else _ratio(_row(rows, "torchferry", n),
                                                                              _row(rows, FLOOR, n))
        how = ", median of paired slices" if str(n) in pairs else ""
        met = None if math.isnan(value) else value >= 0.97
        checks.append(_check(f"torchferry req/s vs a bare Flask app (gunicorn, 2 workers), {n} client(s){how}",
                             ">= 0.97x", value, met,
                             None if met in (None, True) else f"short by {100 * (1 - value / 0.97):.1f} %", note))
    return checks


def _paired_lines(result: dict[str, Any]) -> list[str]:
    """The paired comparison's table: per client count, the median req/s and CPU of each and the ratios."""
    paired = result.get("paired")
    if not paired:
        return []
    if "error" in paired:
        return ["", f"Paired with the bare Flask app: failed ({paired['error']}); the target is read from the rounds."]
    first, second = paired["servers"]
    labels = result.get("labels", {})
    out = ["", (f"Paired: {labels.get(first, first)} and {labels.get(second, second)} both running, the load "
               f"alternating between them in {paired['pairs']} pairs of {paired['seconds_per_slice']:g} s slices "
               f"per client count ({first} then {second}, then the other way round): what else the machine does "
               "falls on both alike. The bare Flask target is read from here."), "",
           (f"| clients | {first} req/s | {second} req/s | {first} CPU ms/req | {second} CPU ms/req | "
           f"{second}/{first} per pair | median |"), "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, p in paired["by_clients"].items():
        out.append(f"| {n} | {_fmt(p['req_s'][first])} | {_fmt(p['req_s'][second])} | "
                   f"{_fmt(p['server_cpu_ms_per_request'][first], 2)} | "
                   f"{_fmt(p['server_cpu_ms_per_request'][second], 2)} | "
                   f"{', '.join(_fmt(r, 3) for r in p['ratios'])} | {_fmt(p['median_ratio'], 3)} |")
    return out


def _fmt(x: Any, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _memory_lines(rows: list[dict[str, Any]], labels: dict[str, str], order: list[str]) -> list[str]:
    """Each server's peak RSS by process (its root first, in the sample with the largest sum), and what half of the
    best peer framework's comes to beside the bare Flask app's own."""
    out = []
    for server in order:
        peak = max((r for r in rows if r["server"] == server), key=lambda r: r["peak_rss_mb"])
        each = peak.get("peak_rss_by_process_mb")
        if each:
            out.append(f"- {labels.get(server, server)}: {_fmt(peak['peak_rss_mb'], 0)} MB = {_fmt(each[0])} (root "
                       f"process) + {' + '.join(_fmt(mb) for mb in each[1:]) or '0'}")
    best = best_framework(rows)
    if best and any(r["server"] == FLOOR for r in rows):
        out.append(f"- the bar, half the peak RSS of the best peer framework ({labels.get(best, best)}): "
                   f"{_fmt(_peak(rows, best) / 2, 0)} MB; the bare Flask app's own: {_fmt(_peak(rows, FLOOR), 0)} MB")
    return ["", "Peak RSS by process (MB):", "", *out] if out else []


def render(result: dict[str, Any], source: str | None = None) -> list[str]:
    """The RESULTS.md section: method, one row per server and client count, the targets."""
    title = "## Serving against the peers (CPU)" + (f": `{source}`, {result.get('date', '')}" if source else "")
    if result.get("not_set_up"):
        return [title, "", f"Not measured: {NOT_SET_UP}.", ""]
    labels = result.get("labels", {})
    out = [title, "", ("`python -m bench.peers` run on its own. " if source else "") + result["method"]
           + f"; {result['seconds_per_point']:g} s per point, {result['rounds']} round(s).", "",
           "| server | clients | req/s | p50 ms | p99 ms | peak RSS MB | server CPU ms/request | load average | round |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = [s for s in (FLOOR, *FRAMEWORKS, "torchferry-before", "torchferry")
             if any(r["server"] == s for r in result["rows"])]
    for server in order:
        for n in CLIENTS:
            r = _row(result["rows"], server, n)
            if r:
                out.append(f"| {labels.get(server, server)} | {n} | {_fmt(r['req_s'])} | {_fmt(r['p50_ms'], 2)} | "
                           f"{_fmt(r['p99_ms'], 2)} | {_fmt(r['peak_rss_mb'], 0)} | "
                           f"{_fmt(r.get('server_cpu_ms_per_request'), 2)} | {_fmt(r['load_average'])} | "
                           f"{r['round']} |")
    out += _memory_lines(result["rows"], labels, order)
    out += _paired_lines(result)
    loads, cpus = [r["load_average"] for r in result["rows"]], result.get("machine", {}).get("cpus") or 0
    if loads and cpus and max(loads) > cpus:
        out += ["", (f"The 1-minute load average beside the figures ran from {min(loads):.1f} to {max(loads):.1f} on "
                     f"{cpus} cores: other work shared the machine, so requests/s and latency here say more about it "
                     "than about the servers; CPU ms per request and peak RSS move far less. Repeat on a quiet machine: "
                     "`python -m bench.peers --setup && python -m bench.peers`, then `python -m bench.run_all --render "
                     "<the newest bench/results/*-all.json>` (or a whole `python -m bench.run_all`).")]
    failed = [f"{r['server']} (round {r['round']}): {r['error']}" for r in result.get("runs", []) if "error" in r]
    out += ["", *(f"Failed: {f}." for f in failed)] if failed else []
    out += ["", "Targets:", ""]
    for c in result.get("targets") or targets(result):
        verdict = "met" if c["met"] else ("no data" if c["met"] is None else f"**short** ({c['short_by']})")
        out.append(f"- {c['target']} {c['bar']}: {_fmt(c['measured'], 3)}x, {verdict}")
    return [*out, ""]
