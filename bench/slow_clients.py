"""Slow clients against gunicorn worker classes: what 64 connections sending 1 byte/s do to a normal client.

    python -m bench.slow_clients [--seconds 8] [--slow 64] [--out PATH]

For each worker class (gunicorn's gthread, gunicorn's gevent, and the production serve.worker.BufferingWorker),
the same serve/gunicorn.conf.py starts a server (all three at once) on 127.0.0.1 with a smallcnn model made here, and:

- `clean`: a normal client sends one small JPEG per request, one after another, for --seconds: p50/p99;
- `load`: 4 clients with keep-alive sessions for --load-seconds, the servers taken in turn --rounds times (so that
  other load on the machine falls on each alike): median requests/s (the throughput the choice must keep);
- `slowloris`: --slow connections trickle 1 byte/s (half a request head, half a body after a complete head;
  reopened when the server closes them) while the normal client runs as in `clean`: answered, p50/p99/max;
- `half_body` / `half_head`: one request that stops half-way; seconds until the server answers 408 or closes.

Loopback only; every loop is bounded by time and count. Writes bench/results/<date>-<host>-slow-clients.json.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import free_port, machine_info, result_header, result_path, write_result
from bench.load import drive, http_caller, make_images, make_model, percentile, start_gunicorn, stop_gunicorn

WORKER_CLASSES = ("gthread", "gevent", "torchferry.serve.worker.BufferingWorker")
CLIENT_TIMEOUT_S = 10.0
STALL_LIMIT_S = 60.0


def normal_client(port: int, image: bytes, seconds: float, max_requests: int = 2000) -> dict[str, Any]:
    """Sequential requests on fresh connections for `seconds`: latency of the answered ones, count of the rest."""
    import requests

    latencies, failed = [], 0
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at and len(latencies) + failed < max_requests:
        t = time.perf_counter()
        try:
            r = requests.post(f"http://127.0.0.1:{port}/predict", data=image, timeout=CLIENT_TIMEOUT_S,
                              headers={"Content-Type": "image/jpeg", "Connection": "close"})
            ok = r.status_code == 200
        except requests.RequestException:
            ok = False
        if ok:
            latencies.append(time.perf_counter() - t)
        else:
            failed += 1
    sent = len(latencies) + failed
    return {"sent": sent, "answered": len(latencies), "failed": failed,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "max_ms": 1000 * max(latencies) if latencies else float("nan")}


class Trickle:
    """`n` connections that each send 1 byte per second: half a request head, half a body; reopened when closed."""

    HEAD = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nX-Pad: " + b"a" * 200
    BODY_HEAD = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"

    def __init__(self, port: int, n: int, seconds: float):
        self.port, self.n, self.stop_at = port, n, time.monotonic() + seconds
        self.done = threading.Event()
        self.reopened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i: int) -> tuple[socket.socket, bytes]:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.setblocking(False)
        if i % 2:  # a complete head, then the body one byte at a time
            s.setblocking(True)
            s.sendall(self.BODY_HEAD)
            s.setblocking(False)
            return s, b"\xff" * 100000
        return s, self.HEAD

    def _run(self) -> None:
        conns = [[*self._open(i), 0] for i in range(self.n)]
        while not self.done.is_set() and time.monotonic() < self.stop_at:
            for i, conn in enumerate(conns):
                s, data, sent = conn
                try:
                    s.send(data[sent:sent + 1])
                    conn[2] += 1
                    if conn[2] >= len(data):
                        raise OSError("all sent")
                except OSError:  # closed by the server (or finished): a slow client would reconnect
                    s.close()
                    self.reopened += 1
                    try:
                        conns[i] = [*self._open(i), 0]
                    except OSError:
                        pass
            self.done.wait(1.0)
        for s, _, _ in conns:
            s.close()

    def __enter__(self):
        self.thread.start()
        time.sleep(2.0)  # every slow connection has started before the normal client
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=10)


def stall(port: int, payload: bytes) -> dict[str, Any]:
    """Send `payload` (a request cut short) and wait, bounded: seconds until the server answers or closes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(payload)
    t = time.monotonic()
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    answer = b""
    try:
        while time.monotonic() - t < STALL_LIMIT_S:
            if sel.select(timeout=1.0):
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        pass
    finally:
        sel.close()
        s.close()
    elapsed = time.monotonic() - t
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else None
    return {"seconds": round(elapsed, 2), "status": status, "closed": elapsed < STALL_LIMIT_S}


def throughput(ports: dict[str, int], images: list[bytes], seconds: float, rounds: int) -> dict[str, Any]:
    """4 keep-alive clients against each server in turn, `rounds` times: median requests/s per worker class."""
    from statistics import median

    runs: dict[str, list[dict]] = {k: [] for k in ports}
    for _ in range(rounds):  # interleaved, so that load from elsewhere on the machine falls on every class alike
        for worker_class, port in ports.items():
            runs[worker_class].append(drive(http_caller(f"http://127.0.0.1:{port}"), images, 4, seconds))
    return {k: {"req_s_median": median(r["req_s"] for r in v), "p50_ms_median": median(r["p50_ms"] for r in v),
                "req_s_runs": [round(r["req_s"], 1) for r in v]} for k, v in runs.items()}


def attack(worker_class: str, port: int, images: list[bytes], seconds: float, slow: int) -> dict[str, Any]:
    row: dict[str, Any] = {"worker_class": worker_class, "clean": normal_client(port, images[0], seconds)}
    with Trickle(port, slow, seconds + 30) as trickle:
        row["slowloris"] = {"slow_connections": slow, **normal_client(port, images[0], seconds)}
        row["slowloris"]["slow_reopened"] = trickle.reopened
    row["half_body"] = stall(port, Trickle.BODY_HEAD + b"\xff" * 500)
    row["half_head"] = stall(port, Trickle.HEAD)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0, help="duration of each client phase (default: 8)")
    p.add_argument("--slow", type=int, default=64, help="slow connections (default: 64)")
    p.add_argument("--load-seconds", type=float, default=3.0, help="each throughput run (default: 3)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved throughput runs per class (default: 5)")
    p.add_argument("--classes", nargs="+", default=list(WORKER_CLASSES), help="worker classes (default: all three)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<date>-<host>-slow-clients.json)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        images = make_images(tmp / "images")
        model = make_model("smallcnn", tmp)
        ports = {k: free_port() for k in args.classes}
        procs = [start_gunicorn(model, port, tmp / f"{k}.log", worker_class=k, extra_env={"TORCHFERRY_THREADS": "4"})
                 for k, port in ports.items()]  # as its figures in README were measured
        try:
            for port in ports.values():
                drive(http_caller(f"http://127.0.0.1:{port}"), images, 2, 1.0)  # warm
            load = throughput(ports, images, args.load_seconds, args.rounds)
            for worker_class, port in ports.items():
                row = {**attack(worker_class, port, images, args.seconds, args.slow), "load": load[worker_class]}
                rows.append(row)
                c, s = row["clean"], row["slowloris"]
                print(f"{worker_class:<30} 4 clients {row['load']['req_s_median']:6.1f} req/s (median) | clean p99 "
                      f"{c['p99_ms']:7.1f} ms | {args.slow} slow: answered {s['answered']}/{s['sent']} p99 "
                      f"{s['p99_ms']:7.1f} ms max {s['max_ms']:7.1f} ms | half body {row['half_body']} | "
                      f"half head {row['half_head']}", flush=True)
        finally:
            for proc in procs:
                stop_gunicorn(proc)
    result = {**result_header("slow_clients"), "machine": machine_info(),
              "seconds_per_phase": args.seconds, "load_seconds": args.load_seconds, "rounds": args.rounds, "slow_connections": args.slow, "rows": rows,
              "method": "torchferry/serve/gunicorn.conf.py with -k CLASS, smallcnn, 1 worker x 4 threads; normal client: "
                        "sequential 320x240 JPEG posts on fresh connections, 10 s client timeout; slow connections "
                        "send 1 byte/s (half request heads, half bodies), reopened when closed"}
    write_result(result, Path(args.out) if args.out else result_path("slow-clients"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
