"""Load tool: N concurrent HTTP clients for T seconds against a torchferry server, beside the same predictor
called in-process, as ratios.

    python -m bench.load --url http://127.0.0.1:8080 --images DIR --clients 4 --seconds 10   # a running server
    python -m bench.load --suite [--quick]     # starts gunicorn itself: smallcnn and resnet18, 1/4/16 clients,
                                               # with and without micro-batching; writes bench/results/*.json
    python -m bench.load --against http://127.0.0.1:8000/predict --images DIR [--pid PID] [--clients 1,4,16]
                                               # any server taking the same raw image body at that URL, with the
                                               # peak RSS of its process tree (bench/peers/ runs the peer servers)

Each client is a thread with its own keep-alive session posting one real image file per request (raw
image/* body), bounded by time and by request count. Reported: requests/s and p50/p95/p99 latency, and with
--against the peak resident memory of the server's whole process tree and the CPU time it spent per request
(psutil, sampled every 50 ms): CPU per request moves far less than requests/s when other work shares the machine. The
in-process figure runs the same decode + preprocess + ONNX Runtime path with the same number of threads,
without HTTP; the ratio server/in-process is what HTTP, Flask and gunicorn cost, the load generator's own HTTP
client included (it shares the machine: `client_cpu_ms_per_request`). For a model that answers in about a
millisecond that ratio is bounded by HTTP itself, whatever the server does, so the suite also runs the bare Flask
app of bench/peers/flask_app.py under gunicorn (gthread) with torchferry's worker and thread counts: server/bare
Flask is what torchferry's own work around the model costs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, free_port, machine_info, result_header, result_path, write_result

MAX_REQUESTS_PER_CLIENT = 100_000


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def drive(call: Callable[[bytes], bool], images: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """Run `clients` threads calling `call(image)` until `seconds` pass; latency percentiles and rate."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop_at = time.perf_counter() + seconds

    def client(i: int) -> None:
        n = i
        while time.perf_counter() < stop_at and n < MAX_REQUESTS_PER_CLIENT * clients:
            t = time.perf_counter()
            ok = call(images[n % len(images)])
            latencies[i].append(time.perf_counter() - t)
            errors[i] += 0 if ok else 1
            n += clients

    start, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    flat = [x for lat in latencies for x in lat]
    return {"clients": clients, "seconds": round(elapsed, 3), "requests": len(flat), "errors": sum(errors),
            "req_s": len(flat) / elapsed, "p50_ms": 1000 * percentile(flat, 50), "p95_ms": 1000 * percentile(flat, 95),
            "p99_ms": 1000 * percentile(flat, 99),
            # this process's CPU (all its threads) per call: the HTTP client's cost, or in-process the whole work
            "client_cpu_ms_per_request": 1000 * cpu / max(1, len(flat))}


def http_caller(url: str, path: str = "/predict") -> Callable[[bytes], bool]:
    """POST each image as a raw image/jpeg body to url + path, one keep-alive session per client thread."""
    import requests

    local = threading.local()

    def call(data: bytes) -> bool:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        r = session.post(url + path, data=data, headers={"Content-Type": "image/jpeg"}, timeout=60)
        return r.status_code == 200

    return call


class TreeProbe:
    """A process and all its descendants while the `with` block runs, sampled every `interval` s on a thread:
    the largest resident memory (RSS summed over the tree), each process's RSS in that sample (`peak_by_process`,
    the root first), and the CPU seconds (user + system) the tree used."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self.peak_by_process: list[int] = []
        self._start: dict[int, float] = {}
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tree-probe", daemon=True)

    def sample(self) -> int:
        """The tree's RSS now, in bytes (processes that end while being read count as 0)."""
        import psutil

        each = []
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                with proc.oneshot():
                    each.append(proc.memory_info().rss)
                    times = proc.cpu_times()
                self._cpu[proc.pid] = times.user + times.system
            except psutil.Error:
                pass
        total = sum(each)
        if total > self.peak:
            self.peak, self.peak_by_process = total, each
        return total

    @property
    def cpu_seconds(self) -> float:
        """CPU the tree used since the block began (a process that ended before the last sample loses its share)."""
        return sum(t - self._start.get(pid, 0.0) for pid, t in self._cpu.items())

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()
        self._start = dict(self._cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def listening_pid(port: int) -> int:
    """The root of the processes listening on TCP `port`: gunicorn's master, not one of its workers (a listening
    socket shared by several processes is reported for one of them, so the parents that hold it too are climbed)."""
    import psutil

    def listens(proc: psutil.Process) -> bool:
        try:
            return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                       for c in proc.net_connections("tcp"))
        except psutil.Error:
            return False

    pids = sorted({c.pid for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid})
    if not pids:
        raise SystemExit(f"no process of this user listens on port {port}; give --pid")
    proc = psutil.Process(pids[0])
    while (parent := proc.parent()) is not None and listens(parent):
        proc = parent
    return proc.pid


def against(url: str, images: list[bytes], clients: list[int], seconds: float, pid: int | None,
            warm_s: float = 1.0) -> list[dict[str, Any]]:
    """The server at `url` (the whole endpoint) at each client count: rate, latency, the peak RSS of its process tree
    and the CPU it spent per request, and the machine's 1-minute load average before each point."""
    host = url.split("//", 1)[-1].split("/", 1)[0]
    port = int(host.rsplit(":", 1)[1]) if ":" in host else 80
    call = http_caller(url, "")
    drive(call, images, 2, warm_s)  # warm connections and code paths
    pid = pid or listening_pid(port)
    rows = []
    for n in clients:
        load = os.getloadavg()[0]
        with TreeProbe(pid) as probe:
            r = drive(call, images, n, seconds)
        rows.append({**r, "peak_rss_mb": probe.peak / 2**20,
                     "peak_rss_by_process_mb": [round(b / 2**20, 1) for b in probe.peak_by_process], "load_average": load,
                     "server_cpu_ms_per_request": 1000 * probe.cpu_seconds / max(1, r["requests"])})
    return rows


def inprocess_caller(model: str, threads: int) -> Callable[[bytes], bool]:
    from torchferry.serve.images import decode, preprocess
    from torchferry.serve.predictor import Predictor

    predictor = Predictor(model, threads)
    spec = predictor.info.preprocess

    def call(data: bytes) -> bool:
        predictor.top_k(predictor.run(preprocess(decode(data, 40_000_000), spec)[None]), 5)
        return True

    return call


def load_images(folder: str) -> list[bytes]:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"no .jpg/.png images under {folder}")
    return [p.read_bytes() for p in paths[:64]]


# ------------------------------------------------------------------------------------------------
# the suite: models made here, gunicorn started here


def make_images(folder: Path, n: int = 16) -> list[bytes]:
    """Photo-sized JPEGs (320×240) with smooth structure and noise, as clients send."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    out = []
    for i in range(n):
        base = np.stack([(xx * (i + 1)) % 256, (yy * (i + 2)) % 256, (xx + yy) % 256], -1)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:02d}.jpg", quality=90)
        out.append((folder / f"{i:02d}.jpg").read_bytes())
    return out


def make_model(arch: str, folder: Path) -> str:
    """A random-weight checkpoint of `arch` exported (and verified) with torchferry's own exporter."""
    import torch

    from torchferry.distributed import checkpoint as ckpt
    from torchferry.distributed.config import TrainConfig, resolve_defaults
    from torchferry.distributed.models import build_model
    from torchferry.export.onnx import export_checkpoint

    small = arch == "smallcnn"
    cfg = resolve_defaults(TrainConfig(data="digits" if small else str(folder), model=arch, name="bench",
                                       image_size=32 if small else 224))
    torch.manual_seed(0)
    model = build_model(arch, 10, channels=int(cfg.channels or 3))
    path = folder / f"{arch}.pth"
    ckpt.save_checkpoint(ckpt.build_checkpoint(model, cfg, [str(i) for i in range(10)], epoch=0,
                                               metrics=dict.fromkeys(ckpt.METRICS, 0.0)), str(path))
    report = export_checkpoint(str(path), str(folder / f"{arch}.onnx"), use_real=False)
    assert report["passed"], report
    return str(folder / f"{arch}.onnx")


def start_gunicorn(model: str, port: int, log: Path, window_ms: float | None = None,
                   worker_class: str | None = None, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """gunicorn -c torchferry/serve/gunicorn.conf.py [-k CLASS] on 127.0.0.1:port, ready (bounded wait);
    `extra_env` adds TORCHFERRY_* settings."""
    import requests

    env = {**os.environ, "TORCHFERRY_MODEL": model, "TORCHFERRY_BIND": f"127.0.0.1:{port}",
           "TORCHFERRY_LOG_LEVEL": "warning", **(extra_env or {})}
    if window_ms is not None:
        env["TORCHFERRY_BATCH_WINDOW_MS"] = str(window_ms)
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "torchferry" / "serve" / "gunicorn.conf.py")]
    if worker_class:
        cmd += ["-k", worker_class]
    with open(log, "w") as out:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    on_gpu = (extra_env or {}).get("TORCHFERRY_DEVICE", "cpu") != "cpu"  # CUDA's start and cuDNN's tuning take longer
    deadline = time.monotonic() + (300 if on_gpu else 90)
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:  # no worker accepts before its model is proven
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{worker_class or 'gunicorn'}: server did not get ready; see {log}")


def stop_gunicorn(proc: subprocess.Popen) -> None:
    """SIGTERM (a graceful stop), then SIGKILL after 40 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_bare_flask(model: str, port: int, log: Path) -> subprocess.Popen:
    """bench/peers/flask_app.py under this environment's gunicorn (gthread) on 127.0.0.1:port with torchferry's default
    worker and thread counts and ONNX Runtime threads (the cores divided among the workers), ready (bounded wait)."""
    import requests

    from torchferry.serve.settings import GunicornSettings

    defaults = GunicornSettings()
    env = {**os.environ, "PEER_MODEL": model, "PEER_WORKERS": str(defaults.workers)}
    cmd = [sys.executable, "-m", "gunicorn", "-w", str(defaults.workers), "-k", "gthread", "--threads",
           str(defaults.threads), "-b", f"127.0.0.1:{port}", "bench.peers.flask_app:create_app()"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the bare Flask app did not get ready; see {log}")


def _server_rows(proc: subprocess.Popen, port: int, images: list[bytes], seconds: float, base: dict[str, Any]):
    """Drive the server at `port` at 1, 4 and 16 clients, then stop it; one row per point."""
    rows = []
    try:
        call = http_caller(f"http://127.0.0.1:{port}")
        drive(call, images, 2, 1.0)  # warm connections and code paths
        for clients in (1, 4, 16):
            r = {**base, **drive(call, images, clients, seconds), "load_average": os.getloadavg()[0]}
            rows.append(r)
            print(f"{base['model']:<9} {base['mode']:<10} win {base['batch_window_ms']:>3.0f}ms clients {clients:>2}: "
                  f"{r['req_s']:7.1f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                  f"client CPU {r['client_cpu_ms_per_request']:5.2f} ms/req  errors {r['errors']}", flush=True)
    finally:
        stop_gunicorn(proc)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each torchferry server point over the in-process point and over the bare Flask point at the same clients."""
    ratios = []
    for arch in dict.fromkeys(r["model"] for r in rows):
        inproc = {r["clients"]: r for r in rows if r["model"] == arch and r["mode"] == "in-process"}
        flask = {r["clients"]: r for r in rows if r["model"] == arch and r["mode"] == "bare-flask"}
        for r in rows:
            if r["model"] != arch or r["mode"] != "server":
                continue
            b, f = inproc[r["clients"]], flask.get(r["clients"])
            ratios.append({"model": arch, "batch_window_ms": r["batch_window_ms"], "clients": r["clients"],
                           "throughput_server_over_inprocess": r["req_s"] / b["req_s"],
                           "p50_server_over_inprocess": r["p50_ms"] / b["p50_ms"],
                           **({"throughput_server_over_flask": r["req_s"] / f["req_s"],
                               "p50_server_over_flask": r["p50_ms"] / f["p50_ms"]} if f else {})})
    return ratios


def suite(quick: bool) -> dict[str, Any]:
    seconds = 3.0 if quick else 10.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        images = make_images(tmp / "images")
        for arch in ("smallcnn", "resnet18"):
            model = make_model(arch, tmp)
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            for clients in (1, 4, 16):
                r = drive(inprocess_caller(model, cores), images, clients, seconds)
                rows.append({"model": arch, "mode": "in-process", "batch_window_ms": 0, **r})
                print(f"{arch:<9} in-process     clients {clients:>2}: {r['req_s']:7.1f} req/s  "
                      f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms", flush=True)
            port = free_port()  # the floor, just before torchferry's server without a batch window
            proc = start_bare_flask(model, port, tmp / f"{arch}-flask.log")
            rows += _server_rows(proc, port, images, seconds, {"model": arch, "mode": "bare-flask", "batch_window_ms": 0})
            for window in (0.0, 5.0):
                port = free_port()
                proc = start_gunicorn(model, port, tmp / f"{arch}-{window}.log", window_ms=window)
                rows += _server_rows(proc, port, images, seconds, {"model": arch, "mode": "server",
                                                                   "batch_window_ms": window})
    return {"rows": rows, "ratios": _ratios(rows), "seconds_per_point": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running torchferry server, e.g. http://127.0.0.1:8080")
    p.add_argument("--against", metavar="URL",
                   help="any server's endpoint taking the same raw image body, e.g. http://127.0.0.1:8000/predict")
    p.add_argument("--pid", type=int, help="with --against: the server's root process (default: the one listening "
                                           "on the URL's port)")
    p.add_argument("--images", help="folder of .jpg/.png files to send (default with --against: generated JPEGs)")
    p.add_argument("--clients", default="4", help="concurrent clients, or a list: 1,4,16 (default: 4)")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each point (default: 10)")
    p.add_argument("--model", help="also run the same model in-process for the ratio")
    p.add_argument("--suite", action="store_true", help="start servers here and measure the standard grid")
    p.add_argument("--quick", action="store_true", help="with --suite: shorter runs")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<date>-<host>-load.json)")
    args = p.parse_args(argv)
    try:
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        p.error(f"--clients takes integers separated by commas, got {args.clients!r}")
    if args.suite:
        result: dict[str, Any] = suite(args.quick)
    else:
        url = args.against or args.url
        if not url or not (args.images or args.against):
            p.error("give --url and --images, --against URL, or --suite")
        host = url.split("//", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            p.error("load is only sent to a server on this machine (127.0.0.1)")
        result = {"rows": measure(args, url, clients)}
    result.update({**result_header("load"), "machine": machine_info(),
                   "method": "threads with keep-alive sessions, one JPEG per request (raw image/jpeg body), "
                             "client and server on the same machine; in-process = decode + preprocess + ORT "
                             "with the same thread count, no HTTP"})
    write_result(result, Path(args.out) if args.out else result_path("load"))
    return 0


def measure(args: argparse.Namespace, url: str, clients: list[int]) -> list[dict[str, Any]]:
    """The rows of one server (and, with --model, of the same model in-process), printed as they come."""
    if args.images:
        images = load_images(args.images)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            images = make_images(Path(tmp))
    if args.against:
        rows = [{"mode": "server", "url": url, **r} for r in against(url, images, clients, args.seconds, args.pid)]
    else:
        rows = [{"mode": "server", **drive(http_caller(url), images, n, args.seconds)} for n in clients]
    if args.model:
        rows += [{"mode": "in-process", **drive(inprocess_caller(args.model, 0), images, n, args.seconds)}
                 for n in clients]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
