"""`python -m serve.healthcheck`: exit 0 when the server answers GET /readyz with 200, else 1 (the image's HEALTHCHECK).

It asks where the server listens, $TORCHFERRY_BIND as torchferry/serve/gunicorn.conf.py reads it (a wildcard host is asked
on loopback, `unix:PATH` over the socket), and it asks /readyz, not /healthz: a container whose model did not load
or failed its proof answers but serves nothing, and Docker should not call that healthy. One line on stdout says
what it saw (`docker inspect` keeps it in the health log).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys

from torchferry.cli import Parser
from torchferry.serve.settings import GunicornSettings

DEFAULT_BIND: str = GunicornSettings.bind  # TORCHFERRY_BIND's default (serve/settings.py)
TIMEOUT_S = 2.0


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (gunicorn's `unix:PATH` bind)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def connection_for(bind: str, timeout: float = TIMEOUT_S) -> http.client.HTTPConnection:
    """A connection to the server bound at `bind` (HOST:PORT, [V6]:PORT, HOST, unix:PATH); wildcards → loopback."""
    bind = bind.strip().split(",")[0].strip() or DEFAULT_BIND
    if bind.startswith("unix:"):
        return _UnixHTTPConnection(bind[len("unix:"):], timeout)
    if bind.startswith("["):  # [V6]:PORT
        host, _, rest = bind[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif bind.count(":") == 1:  # HOST:PORT
        host, port = bind.split(":")
    else:  # HOST, PORT, or a bare IPv6 address
        host, port = ("", bind) if bind.isdigit() else (bind, "")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        number = int(port or 8000)  # gunicorn's port when the bind names none
    except ValueError:
        raise ValueError(f"TORCHFERRY_BIND {bind!r} is not HOST:PORT or unix:PATH") from None
    return http.client.HTTPConnection(host, number, timeout=timeout)


def check(bind: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """(ready, one line saying why) for the server bound at `bind`."""
    try:
        conn = connection_for(bind, timeout)
    except ValueError as exc:
        return False, str(exc)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        body = response.read(4096)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"/readyz on {bind}: no answer ({exc})"
    finally:
        conn.close()
    if response.status == 200:
        return True, f"/readyz on {bind}: 200"
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        reason = None
    return False, f"/readyz on {bind}: {response.status}" + (f" ({reason})" if reason else "")


def get_args_parser() -> Parser:
    """No flags: where to ask comes from $TORCHFERRY_BIND, as the server's; --help says so (and asks nothing)."""
    return Parser(prog="python -m serve.healthcheck", description="Exit 0 when the server answers GET /readyz with "
                  f"200, else 1, with one line saying what it saw; it asks where $TORCHFERRY_BIND (default "
                  f"{DEFAULT_BIND}) says gunicorn listens. The serve image's HEALTHCHECK.")


def main(argv: list[str] | None = None) -> int:
    """Probe $TORCHFERRY_BIND's /readyz; 0 when ready, 1 otherwise."""
    get_args_parser().parse_args(argv)
    ready, line = check(os.environ.get("TORCHFERRY_BIND") or DEFAULT_BIND)
    print(line)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
