"""torchferry's gunicorn server against a bare Flask app, LitServe, BentoML and Ray Serve, side by side.

    python -m bench.peers --setup          # the peers' venvs under ~/.cache/torchferry/peers (PyPI, pinned)
    python -m bench.peers [--quick]        # 2 interleaved rounds; bench/results/<date>-<host>-peers.json and a table

One load generator (bench/load.py's threads with keep-alive sessions) sends the same generated JPEGs as raw
image/jpeg bodies to each server's /predict on 127.0.0.1; every server runs the same exported smallcnn with the
same decode, preprocessing and ONNX Runtime call (bench/peers/classify.py; torchferry its own), 2 workers, ONNX
Runtime threads = cores / workers. Per server and client count (1, 4, 16): requests/s, p50 and p99 latency, and the
peak RSS of the server's whole process tree (psutil). The servers run one after the other in rounds (Flask,
LitServe, BentoML, Ray Serve, torchferry, then again); for each server the quieter of its rounds (the lower mean
1-minute load average before its points) is reported, with that load average beside each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, free_port, machine_info, repo_env, result_header, result_path, run, write_result
from bench.peers import report

HERE = Path(__file__).resolve().parent
HOME = Path(os.environ.get("TORCHFERRY_PEERS_HOME", Path.home() / ".cache" / "torchferry" / "peers"))
WORKERS = 2
CLIENTS = (1, 4, 16)
READY_TIMEOUT_S = 240.0  # Ray on 2 busy cores takes a minute or more to start
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@dataclass(frozen=True)
class Server:
    """One server of the comparison: how it starts, and from which venv (None: this environment)."""

    name: str
    label: str
    venv: str | None
    args: tuple[str, ...]
    root: Path = ROOT  # the checkout it runs from (--baseline: an earlier one)

    def python(self) -> str:
        return str(HOME / self.venv / "bin" / "python") if self.venv else sys.executable

    def command(self, port: int) -> list[str]:
        return [self.python(), *(a.replace("{port}", str(port)) for a in self.args)]


PEERS = (
    Server("flask", "Flask (bare), gunicorn gthread 2 workers × 4 threads", "flask",
           ("-m", "gunicorn", "-w", str(WORKERS), "-k", "gthread", "--threads", "4", "-b", "127.0.0.1:{port}",
            "bench.peers.flask_app:create_app()")),
    Server("litserve", f"LitServe, {WORKERS} workers", "litserve", ("-m", "bench.peers.litserve_app")),
    Server("bentoml", f"BentoML, {WORKERS} workers", "bentoml",
           ("-m", "bentoml", "serve", "bench.peers.bentoml_service:Classify", "--host", "127.0.0.1", "--port", "{port}")),
    Server("rayserve", f"Ray Serve, {WORKERS} replicas", "rayserve", ("-m", "bench.peers.rayserve_app")),
)
TORCHFERRY = Server("torchferry", f"torchferry, gunicorn -c torchferry/serve/gunicorn.conf.py, {WORKERS} workers",
                    None, ("-m", "gunicorn", "-c", str(ROOT / "torchferry" / "serve" / "gunicorn.conf.py")))
SERVERS = (*PEERS, TORCHFERRY)


def baseline(folder: str) -> Server:
    """torchferry's server from another checkout (e.g. `git worktree add /tmp/before <rev>`), measured beside this one."""
    root = Path(folder).resolve()
    rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False).stdout.strip() or root.name
    return Server("torchferry-before", f"torchferry at {rev} (before), {WORKERS} workers", None,
                  ("-m", "gunicorn", "-c", str(root / "torchferry" / "serve" / "gunicorn.conf.py")), root)


# ------------------------------------------------------------------------------------------------
# the venvs


def requirements(peer: Server) -> Path:
    return HERE / f"requirements-{peer.name}.txt"


def _stamp(peer: Server) -> str:
    return hashlib.sha256(requirements(peer).read_bytes()).hexdigest()


def missing_venvs() -> list[str]:
    """The peers whose venv is absent or was built from other requirements than bench/peers/ pins now."""
    missing = []
    for peer in PEERS:
        stamp = HOME / peer.name / "torchferry-requirements.sha256"
        if not (Path(peer.python()).exists() and stamp.exists() and stamp.read_text().strip() == _stamp(peer)):
            missing.append(peer.name)
    return missing


def setup(names: list[str]) -> int:
    """Create each named peer's venv from its pinned requirements (skipped when already built from the same file)."""
    base = getattr(sys, "_base_executable", sys.executable)
    for peer in (p for p in PEERS if p.name in names):
        if peer.name not in missing_venvs():
            print(f"{peer.name}: up to date ({HOME / peer.name})")
            continue
        folder = HOME / peer.name
        print(f"{peer.name}: creating {folder} from {requirements(peer).relative_to(ROOT)}", flush=True)
        subprocess.run([base, "-m", "venv", "--clear", str(folder)], check=True)
        subprocess.run([peer.python(), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "-r", str(requirements(peer))], check=True)
        (folder / "torchferry-requirements.sha256").write_text(_stamp(peer) + "\n")
    return 0


# ------------------------------------------------------------------------------------------------
# one server: start, check, measure, stop


def server_env(server: Server, model: str, port: int) -> dict[str, str]:
    """The repository on PYTHONPATH, the model and port, and each framework's quiet switches."""
    extra = {"PEER_MODEL": model, "PEER_PORT": str(port), "PEER_WORKERS": str(WORKERS),
             "BENTOML_DO_NOT_TRACK": "True", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # This checkout first on PYTHONPATH; a baseline's own checkout alone.
    env = repo_env(**extra) if server.root == ROOT else {**os.environ, "PYTHONPATH": str(server.root), **extra}
    if server.venv:
        env["PATH"] = f"{HOME / server.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(HOME / server.venv)
    else:  # torchferry's production settings, 2 workers, everything else at its defaults
        env.update(TORCHFERRY_MODEL=model, TORCHFERRY_BIND=f"127.0.0.1:{port}", TORCHFERRY_WORKERS=str(WORKERS))
    return env


def wait_ready(proc: subprocess.Popen, url: str, image: bytes, log: Path) -> None:
    """Until one POST of `image` answers 200 (bounded); a server that exits or never answers is an error."""
    import requests

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it answered; see {log}")
        try:
            if requests.post(url, data=image, headers={"Content-Type": "image/jpeg"}, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"did not answer within {READY_TIMEOUT_S:g} s; see {log}")


def listeners_off_loopback(pid: int) -> list[str]:
    """Addresses that the process tree of `pid` listens on beyond loopback (there should be none)."""
    import psutil

    root = psutil.Process(pid)
    pids = {p.pid for p in [root, *root.children(recursive=True)]}
    return sorted(f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.net_connections("inet")
                  if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.ip not in LOOPBACK)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever of its tree is left after 40 s."""
    import psutil

    try:
        tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.Error:
        tree = [proc.pid]
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        pass
    for pid in tree:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    proc.wait()


@contextlib.contextmanager
def serving(server: Server, model: str, images: list[bytes], logs: Path) -> Iterator[tuple[str, int]]:
    """(its /predict URL, its pid) while `server` runs, once it answers and is seen to bind loopback only."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/predict"
    log = logs / f"{server.name}-{time.strftime('%H%M%S')}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(server.command(port), cwd=server.root, env=server_env(server, model, port), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(proc, url, images[0], log)
        exposed = listeners_off_loopback(proc.pid)
        if exposed:
            raise RuntimeError(f"listens beyond loopback on {', '.join(exposed)}; refused")
        yield url, proc.pid
    finally:
        stop(proc)


def measure(server: Server, model: str, images: list[bytes], seconds: float, logs: Path) -> list[dict[str, Any]]:
    """Start `server`, drive it at every client count, stop it."""
    from bench.load import against

    with serving(server, model, images, logs) as (url, pid):
        return against(url, images, list(CLIENTS), seconds, pid)


def paired(first: Server, second: Server, pairs: int, seconds: float, tmp: Path) -> dict[str, Any]:
    """The two servers side by side: both run at once, and at each client count the load alternates between them
    in `pairs` pairs of `seconds` each (first, second; then second, first; ...), so that what else the machine does
    falls on both alike. Per pair, second's req/s over first's; reported: the median of those ratios."""
    from bench.load import against, make_images, make_model

    images, model = make_images(tmp / "images"), make_model("smallcnn", tmp)
    out: dict[str, Any] = {"servers": [first.name, second.name], "pairs": pairs, "seconds_per_slice": seconds,
                           "by_clients": {}}
    with serving(first, model, images, tmp) as a, serving(second, model, images, tmp) as b:
        for n in CLIENTS:
            slices: dict[str, list[dict[str, Any]]] = {first.name: [], second.name: []}
            for i in range(pairs):
                for server, (url, pid) in ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a)):
                    slices[server.name].append(against(url, images, [n], seconds, pid, warm_s=0.2)[0])
            # A pair with a failed request or an empty slice has no ratio: fast errors would count as requests/s.
            ratios = [y["req_s"] / x["req_s"] for x, y in zip(slices[first.name], slices[second.name])
                      if x["req_s"] > 0 and y["req_s"] > 0 and not x["errors"] and not y["errors"]]
            if not ratios:
                raise RuntimeError(f"no pair at {n} client(s) ran without errors")
            out["by_clients"][str(n)] = {
                "ratios": ratios, "median_ratio": statistics.median(ratios),
                "errors": {s: sum(r["errors"] for r in rows) for s, rows in slices.items()},
                "req_s": {s: statistics.median(r["req_s"] for r in rows) for s, rows in slices.items()},
                "server_cpu_ms_per_request": {s: statistics.median(r["server_cpu_ms_per_request"] for r in rows)
                                              for s, rows in slices.items()}}
            print(f"  paired, clients {n:>2}: {second.name}/{first.name} req/s median "
                  f"{out['by_clients'][str(n)]['median_ratio']:.3f} over {pairs} pairs "
                  f"({', '.join(f'{r:.3f}' for r in ratios)})", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# rounds


def run_rounds(servers: list[Server], rounds: int, seconds: float, tmp: Path) -> list[dict[str, Any]]:
    """Every server once per round, in order; a server that fails is recorded with its error and skipped."""
    from bench.load import make_images, make_model

    images, model = make_images(tmp / "images"), make_model("smallcnn", tmp)
    runs = []
    for r in range(1, rounds + 1):
        for server in servers:
            print(f"round {r}: {server.label}", flush=True)
            try:
                rows = measure(server, model, images, seconds, tmp)
            except RuntimeError as exc:
                print(f"  {server.name}: {exc}", flush=True)
                runs.append({"server": server.name, "round": r, "error": str(exc)})
                continue
            for row in rows:
                print(f"  clients {row['clients']:>2}: {row['req_s']:7.1f} req/s  p50 {row['p50_ms']:6.2f} ms  "
                      f"p99 {row['p99_ms']:6.2f} ms  peak RSS {row['peak_rss_mb']:6.0f} MB  "
                      f"CPU {row['server_cpu_ms_per_request']:5.2f} ms/req  "
                      f"errors {row['errors']}  load {row['load_average']:.1f}", flush=True)
            runs.append({"server": server.name, "round": r, "rows": rows})
    return runs


def for_run_all(tmp: str, quick: bool, env: dict[str, str]) -> dict[str, Any]:
    """bench.run_all's part: python -m bench.peers as its own process when its venvs are set up, else a result that
    says how to set them up (not a failure)."""
    if missing_venvs():
        print(f"peers: {report.NOT_SET_UP}", flush=True)
        return {"not_set_up": report.NOT_SET_UP}
    out = Path(tmp, "peers.json")
    run([sys.executable, "-m", "bench.peers", *(["--quick"] if quick else []), "--out", str(out)], env)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", action="store_true", help=f"create the peers' venvs (those --only names) under {HOME} and exit")
    p.add_argument("--quick", action="store_true", help="4 s per point instead of 10")
    p.add_argument("--seconds", type=float, default=None, help="seconds per point (default: 10, --quick 4)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: 2)")
    p.add_argument("--pairs", type=int, default=None, help="torchferry against the bare Flask app with both running, "
                   "the load alternating between them: pairs of slices per client count (default: 6, --quick 4; "
                   "0: not measured)")
    p.add_argument("--only", default=",".join(s.name for s in SERVERS),
                   help="servers, comma-separated (default: all: flask,litserve,bentoml,rayserve,torchferry)")
    p.add_argument("--baseline", metavar="DIR", help="also run torchferry's server from this checkout of an earlier "
                                                     "revision (git worktree add DIR REV), just before this one's")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<date>-<host>-peers.json)")
    args = p.parse_args(argv)
    if args.baseline and not (Path(args.baseline) / "torchferry" / "serve" / "gunicorn.conf.py").is_file():
        p.error(f"--baseline {args.baseline}: not a torchferry checkout (no torchferry/serve/gunicorn.conf.py)")
    names = args.only.split(",")
    if args.setup:
        return setup(names)
    servers = [*PEERS, *([baseline(args.baseline)] if args.baseline else []), TORCHFERRY]
    names += ["torchferry-before"] if args.baseline else []
    unknown = sorted(set(names) - {s.name for s in servers})
    if unknown or args.rounds < 1:
        p.error(f"unknown server(s) {unknown}; choose from {[s.name for s in SERVERS]}" if unknown
                else "--rounds must be at least 1")
    absent = sorted(set(missing_venvs()) & set(names))
    if absent:
        print(f"not set up ({', '.join(absent)}): run python -m bench.peers --setup", file=sys.stderr)
        return 2
    seconds = args.seconds or (4.0 if args.quick else 10.0)
    pairs = (4 if args.quick else 6) if args.pairs is None else args.pairs
    with tempfile.TemporaryDirectory(prefix="tf-peers-") as tmp:
        runs = run_rounds([s for s in servers if s.name in names], args.rounds, seconds, Path(tmp))
        floor = None
        if pairs > 0 and {report.FLOOR, "torchferry"} <= set(names):
            print(f"paired: {PEERS[0].label} and {TORCHFERRY.label}, {pairs} pairs of {seconds / 2:g} s slices",
                  flush=True)
            try:
                floor = paired(PEERS[0], TORCHFERRY, pairs, seconds / 2, Path(tmp))
            except RuntimeError as exc:  # recorded, as a server failing its round is; the rounds' figures stand
                print(f"  paired: {exc}", flush=True)
                floor = {"error": str(exc)}
    result = {**result_header("peers"), "machine": machine_info("onnxruntime"), "seconds_per_point": seconds,
              "rounds": args.rounds, "workers": WORKERS, "labels": {s.name: s.label for s in servers},
              "method": report.METHOD, "runs": runs, **({"paired": floor} if floor else {})}
    result.update(report.choose(runs))
    result["targets"] = report.targets(result)
    write_result(result, Path(args.out) if args.out else result_path("peers"))
    print("\n".join(report.render(result)))
    return 0
