"""bench/peers without its venvs: the peers' shared work equals the server's, the bare Flask peer answers like
torchferry, the verdicts and the quieter-round choice, the tree memory probe, and "not set up" when the venvs are
absent (the comparison itself runs only on demand: python -m bench.peers)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import common, run_all
from bench.load import TreeProbe, listening_pid
from bench.peers import report
from bench.peers.classify import prepare as peer_prepare
from torchferry.serve.images import prepare

REPO = Path(__file__).resolve().parents[1]
SPECS = [
    {"size": [32, 32], "resize": 32, "mean": [0.5], "std": [0.5], "channels": 1},
    {"size": [16, 16], "resize": 18, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": 3},
    {"size": [28, 20], "resize": 40, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "channels": 3},
]


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("spec", SPECS)
def test_the_peers_preprocessing_is_the_servers(spec: dict) -> None:
    for i, (w, h) in enumerate([(320, 240), (37, 53), (64, 64)]):
        data = _jpeg(w, h, i)
        assert np.array_equal(peer_prepare(data, spec), prepare(data, spec, 40_000_000)), (w, h)


def test_the_bare_flask_peer_answers_what_torchferry_answers(exported_model: dict, monkeypatch) -> None:
    from bench.peers.flask_app import create_app
    from torchferry.serve.app import create_app as torchferry_app

    monkeypatch.setenv("PEER_MODEL", str(exported_model["model"]))
    image = next(p for p in sorted(Path(exported_model["data"], "val").rglob("*.png")) if "red" in str(p)).read_bytes()
    peer = create_app().test_client().post("/predict", data=image, content_type="image/png")
    ours = torchferry_app({"MODEL": str(exported_model["model"]), "LOAD_SYNC": True}).test_client().post(
        "/predict", data=image, content_type="image/png")
    assert peer.status_code == ours.status_code == 200
    a, b = peer.get_json()["predictions"][0], ours.get_json()["predictions"][0]
    assert a["label"] == b["label"] == "red" and abs(a["score"] - b["score"]) < 1e-6


def _result(flask: float, tf: float, lit: float, bento: float, tf_mb: float = 200.0) -> dict:
    rows = []
    for server, rate, mb in (("flask", flask, 190.0), ("torchferry", tf, tf_mb), ("litserve", lit, 900.0),
                             ("bentoml", bento, 500.0)):
        rows += [{"server": server, "round": 1, "clients": n, "req_s": rate * (1 + n / 100), "p50_ms": 1.0,
                  "p99_ms": 2.0, "peak_rss_mb": mb, "load_average": 1.0} for n in report.CLIENTS]
    return {"rows": rows}


def test_targets_compare_with_the_best_framework_and_the_bare_flask_app() -> None:
    checks = report.targets(_result(flask=300.0, tf=295.0, lit=250.0, bento=280.0))
    assert report.best_framework(_result(300.0, 295.0, 250.0, 280.0)["rows"]) == "bentoml"
    assert [c["met"] for c in checks] == [True, True, True, True, True, True, True]
    assert "bentoml" in checks[0]["target"] and checks[3]["measured"] == pytest.approx(200 / 500)
    checks = report.targets(_result(flask=300.0, tf=270.0, lit=250.0, bento=280.0, tf_mb=300.0))
    assert [c["met"] for c in checks] == [False, False, False, False, False, False, False]
    assert checks[0]["short_by"] == "short by 3.6 %" and checks[3]["short_by"] == "0.10x over"
    assert checks[4]["short_by"] == "short by 7.2 %"


def test_the_bare_flask_target_is_read_from_the_paired_slices_when_measured() -> None:
    """Single rounds minutes apart put the two servers under different loads: the floor's ratio is then the median
    of the pairs measured with both running, and the table shows every pair."""
    result = _result(flask=300.0, tf=270.0, lit=250.0, bento=280.0)  # 0.90x in the rounds
    result["paired"] = {"servers": ["flask", "torchferry"], "pairs": 3, "seconds_per_slice": 2.0, "by_clients": {
        str(n): {"ratios": [0.95, 0.99, 1.02], "median_ratio": 0.99, "req_s": {"flask": 300.0, "torchferry": 297.0},
                 "server_cpu_ms_per_request": {"flask": 2.0, "torchferry": 2.1}} for n in report.CLIENTS}}
    checks = report.targets(result)
    assert [c["measured"] for c in checks[4:]] == [0.99] * 3 and all(c["met"] for c in checks[4:])
    assert "median of paired slices" in checks[4]["target"]
    assert report.targets(_result(flask=300.0, tf=270.0, lit=250.0, bento=280.0))[4]["met"] is False  # no pairs
    text = "\n".join(report.render({**result, "method": "m", "seconds_per_point": 1, "rounds": 1}))
    assert "| 1 | 300.0 | 297.0 | 2.00 | 2.10 | 0.950, 0.990, 1.020 | 0.990 |" in text


@pytest.mark.slow
def test_paired_slices_alternate_between_two_running_servers(tmp_path: Path) -> None:
    """Two servers (the bare Flask app twice, from this environment) run at once; each client count gets its pairs,
    the order alternating, a ratio per pair and their median."""
    from bench.peers import run as peers_run

    flask = peers_run.Server("flask", "Flask", None, peers_run.PEERS[0].args)
    twin = peers_run.Server("twin", "Flask again", None, peers_run.PEERS[0].args)
    out = peers_run.paired(flask, twin, pairs=2, seconds=0.3, tmp=tmp_path)
    assert out["servers"] == ["flask", "twin"] and set(out["by_clients"]) == {str(n) for n in report.CLIENTS}
    for p in out["by_clients"].values():
        assert len(p["ratios"]) == 2 and all(r > 0 for r in p["ratios"])
        assert p["median_ratio"] == pytest.approx(sum(p["ratios"]) / 2)
        assert p["req_s"]["flask"] > 0 and p["req_s"]["twin"] > 0


def test_the_report_breaks_peak_memory_down_by_process() -> None:
    result = _result(flask=300.0, tf=270.0, lit=250.0, bento=280.0)
    for row in result["rows"]:
        row["peak_rss_by_process_mb"] = {"flask": [30.0, 80.0, 80.0], "torchferry": [40.0, 80.0, 80.0]}.get(row["server"])
    text = "\n".join(report.render({**result, "method": "m", "seconds_per_point": 1, "rounds": 1}))
    assert "- flask: 190 MB = 30.0 (root process) + 80.0 + 80.0" in text
    assert "- torchferry: 200 MB = 40.0 (root process) + 80.0 + 80.0" in text
    assert "- the bar, half the peak RSS of the best peer framework (bentoml): 250 MB; the bare Flask app's own: 190 MB" in text
    assert "- litserve:" not in text  # rows without the breakdown (older results) are left out


def test_the_quieter_round_of_each_server_is_reported() -> None:
    def run(server: str, r: int, load: float, rate: float) -> dict:
        return {"server": server, "round": r, "rows": [{"clients": 1, "req_s": rate, "load_average": load}]}

    runs = [run("flask", 1, 5.0, 100.0), run("torchferry", 1, 2.0, 90.0), run("flask", 2, 3.0, 80.0),
            run("torchferry", 2, 4.0, 120.0), {"server": "rayserve", "round": 1, "error": "did not answer"}]
    chosen = report.choose(runs)
    assert chosen["chosen"] == {"flask": 2, "torchferry": 1}
    assert {(r["server"], r["req_s"]) for r in chosen["rows"]} == {("flask", 80.0), ("torchferry", 90.0)}


def test_the_tree_probe_counts_the_childrens_memory_and_cpu_and_finds_the_listener() -> None:
    child = ("import time; b = bytearray(80 * 2**20); t = time.process_time()\n"
             "while time.process_time() - t < 1.0: pass\n"
             "time.sleep(60)")
    code = ("import socket, subprocess, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
            f"print(s.getsockname()[1], flush=True); "
            f"c = subprocess.Popen([sys.executable, '-c', {child!r}], pass_fds=[s.fileno()]); "  # shares it, as workers do
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        port = int(proc.stdout.readline())
        assert listening_pid(port) == proc.pid
        deadline = time.monotonic() + 60
        with TreeProbe(proc.pid, interval=0.02) as probe:
            while (probe.sample() < 80 * 2**20 or probe.cpu_seconds < 0.9) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert probe.peak >= 80 * 2**20  # the child's 80 MB count in the root's tree
        root, child_rss = probe.peak_by_process  # and in the peak's breakdown, under the child, the root first
        assert child_rss >= 80 * 2**20 > root and root + child_rss == probe.peak
        assert 0.9 <= probe.cpu_seconds < 30  # and its second of CPU
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_without_the_venvs_the_comparison_says_how_to_set_it_up(tmp_path: Path) -> None:
    env = common.repo_env(TORCHFERRY_PEERS_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "bench.peers", "--quick"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "not set up" in proc.stderr and "python -m bench.peers --setup" in proc.stderr
    checks = [c for c in run_all.check_targets({"peers": {"not_set_up": report.NOT_SET_UP}})
              if c["target"].startswith(("torchferry req/s", "torchferry peak RSS"))]
    assert len(checks) == 7 and {c["met"] for c in checks} == {None}
    assert {c["note"] for c in checks} == {report.NOT_SET_UP}
    text = "\n".join(run_all._render_targets(checks))
    assert "not set up: run python -m bench.peers --setup" in text and "**no**" not in text
