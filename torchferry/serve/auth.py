"""Bearer-token authentication: off by default, one setting turns it on for every route but the probes.

The token comes from TORCHFERRY_AUTH_TOKEN, or from the file named by TORCHFERRY_AUTH_TOKEN_FILE (a
Kubernetes Secret mounted as a volume). The file is re-read when it changes, so a rotated Secret takes
effect without a restart; if it becomes unreadable the last token read stays in force (never none).
Tokens are compared in constant time, on their sha256 digests so that not even the length leaks.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading

_logger = logging.getLogger("torchferry.serve")

# Liveness and readiness: kubelet and load balancers probe these without credentials.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
REALM = "torchferry"


def _valid(token: str, where: str) -> str:
    token = token.strip()
    if not token:
        raise ValueError(f"{where} is empty; put the bearer token in it, or unset it to turn authentication off")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"{where} holds whitespace or control characters; a bearer token is one printable word")
    if not token.isascii():  # HTTP headers arrive as latin-1: a client could never send it so that it matches
        raise ValueError(f"{where} holds non-ASCII characters; a bearer token is printable ASCII (RFC 6750)")
    return token


class BearerAuth:
    """Checks `Authorization: Bearer <token>` against the configured token; `enabled` is False without one."""

    def __init__(self, token: str | None = None, token_file: str | None = None):
        # None means unset. An empty string is a setting that went wrong (a Secret key with no value, a
        # compose file's ${TOKEN} with TOKEN unset): an error, never authentication silently off.
        if token is not None and token_file is not None:
            raise ValueError("set TORCHFERRY_AUTH_TOKEN or TORCHFERRY_AUTH_TOKEN_FILE, not both")
        if token_file is not None and not token_file.strip():
            raise ValueError("TORCHFERRY_AUTH_TOKEN_FILE is set but empty; name the token file, or unset it to "
                             "turn authentication off")
        self.token_file = token_file
        self._digest: bytes | None = None
        self._stamp: tuple | None = None
        self._lock = threading.Lock()
        if token is not None:
            self._digest = hashlib.sha256(_valid(token, "TORCHFERRY_AUTH_TOKEN").encode()).digest()
        elif self.token_file:
            self._reload(first=True)
        if not self.enabled:
            _logger.warning("authentication is off: every route answers without a token; set "
                            "TORCHFERRY_AUTH_TOKEN or TORCHFERRY_AUTH_TOKEN_FILE to require one")

    @property
    def enabled(self) -> bool:
        """True when a token is configured."""
        return self._digest is not None

    def _reload(self, first: bool = False) -> None:
        """Read the token file when its (inode, size, mtime) changed; at start-up a problem is an error."""
        assert self.token_file is not None
        try:
            st = os.stat(self.token_file)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return
            with open(self.token_file, encoding="utf-8") as f:
                token = _valid(f.read(), f"token file {self.token_file}")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            if first:
                raise ValueError(f"TORCHFERRY_AUTH_TOKEN_FILE={self.token_file!r}: {exc}") from None
            if self._stamp != ("unreadable",):
                _logger.error("token file %s is unreadable (%s); keeping the token read before", self.token_file, exc)
                self._stamp = ("unreadable",)
            return
        self._digest, self._stamp = hashlib.sha256(token.encode()).digest(), stamp

    def check(self, header: str | None) -> tuple[str, str] | None:
        """None when `header` carries the token; else (RFC 6750 error code or "", message) for the 401."""
        if self.token_file:
            with self._lock:
                self._reload()
        scheme, _, credentials = (header or "").strip().partition(" ")
        if not header:
            return "", "authentication required: send 'Authorization: Bearer <token>'"
        if scheme.lower() != "bearer" or not credentials.strip():
            return "invalid_request", "the Authorization header must be 'Bearer <token>'"
        given = hashlib.sha256(credentials.strip().encode("utf-8", "surrogateescape")).digest()
        assert self._digest is not None
        if not hmac.compare_digest(given, self._digest):
            return "invalid_token", "the bearer token is not valid"
        return None

    @staticmethod
    def challenge(error: str) -> str:
        """The WWW-Authenticate header value for a 401."""
        return f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
