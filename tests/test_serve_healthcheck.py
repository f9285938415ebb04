"""The image's HEALTHCHECK (`python -m serve.healthcheck`): it asks /readyz where TORCHFERRY_BIND says the server
listens, against real HTTP servers on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from torchferry.serve.healthcheck import check, connection_for

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bind,host,port", [
    ("0.0.0.0:9001", "127.0.0.1", 9001),
    ("127.0.0.1:8080", "127.0.0.1", 8080),
    ("[::]:9002", "::1", 9002),
    ("[::1]:9003", "::1", 9003),
    (":9004", "127.0.0.1", 9004),
    ("9005", "127.0.0.1", 9005),
    ("localhost", "localhost", 8000),
    ("0.0.0.0:9006,unix:/tmp/x.sock", "127.0.0.1", 9006),
])
def test_bind_addresses_map_to_where_the_server_answers(bind: str, host: str, port: int) -> None:
    conn = connection_for(bind)
    assert (conn.host, conn.port) == (host, port)


def test_a_malformed_bind_is_a_clear_failure() -> None:
    ready, line = check("0.0.0.0:http-ish")
    assert not ready and "TORCHFERRY_BIND" in line and "0.0.0.0:http-ish" in line


class _Readiness(BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:
        body = json.dumps({"status": "ready"} if self.status == 200 else
                          {"status": "not_ready", "reason": "golden outputs differ"}).encode()
        code = self.status if self.path == "/readyz" else 200  # /healthz and the rest: alive
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def readiness_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Readiness]]]:
    """A real HTTP server on 127.0.0.1 whose /readyz answers `handler.status` and every other path 200."""
    handler = type("Handler", (_Readiness,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def run_healthcheck(bind: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHFERRY_BIND": bind}
    return subprocess.run([sys.executable, "-m", "serve.healthcheck"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30, check=False)


def test_ready_server_is_healthy_on_a_non_default_port(readiness_server) -> None:
    server, handler = readiness_server
    handler.status = 200
    proc = run_healthcheck(f"0.0.0.0:{server.server_address[1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": 200" in proc.stdout


def test_alive_but_not_ready_is_unhealthy_with_the_reason(readiness_server) -> None:
    server, handler = readiness_server
    handler.status = 503
    proc = run_healthcheck(f"127.0.0.1:{server.server_address[1]}")
    assert proc.returncode == 1
    assert "503" in proc.stdout and "golden outputs differ" in proc.stdout


def test_nothing_listening_is_unhealthy() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        proc = run_healthcheck(f"127.0.0.1:{port}")
    assert proc.returncode == 1 and "no answer" in proc.stdout


def test_unix_socket_bind(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"

    class UnixServer(ThreadingHTTPServer):
        address_family = socket.AF_UNIX

        def server_bind(self) -> None:
            self.socket.bind(self.server_address)
            self.server_name, self.server_port = "localhost", 0

    handler = type("Handler", (_Readiness,), {"status": 200, "address_string": lambda self: "unix"})
    server = UnixServer(str(path), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert check(f"unix:{path}") == (True, f"/readyz on unix:{path}: 200")
    finally:
        server.shutdown()
        server.server_close()


def test_help_says_what_it_does_and_asks_nothing(capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from torchferry.serve import healthcheck

    monkeypatch.setattr(healthcheck, "check", lambda *a, **k: pytest.fail("--help probed the server"))
    with pytest.raises(SystemExit) as stop:
        healthcheck.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("usage: python -m serve.healthcheck") and "/readyz" in out
    with pytest.raises(SystemExit) as stop:
        healthcheck.main(["--port", "9000"])
    assert stop.value.code == 2 and capsys.readouterr().err.count("\n") == 1
