"""The server's JSON access line, one per request: method, route, status, ms, inputs, body bytes.

A request's thread hands the line's fields to `line`. By default they are logged there and then; under gunicorn
(torchferry/serve/gunicorn.conf.py's post_fork) they go to the worker's log writer queue (serve/worker.py), whose
thread makes the JSON line and its log record. Inside a worker under load those two took about 35 µs a request
(json.dumps 14, the log record 22: about 2 % of a small image's request), spent now after the answer has left.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

ACCESS = logging.getLogger("torchferry.serve.access")
_sink: Callable[[tuple], None] | None = None  # the log writer's queue.put, or None: log in the request's thread


def enabled() -> bool:
    """Whether access lines are logged (the logger's level: it is cached by logging)."""
    return ACCESS.isEnabledFor(logging.INFO)


def line(fields: tuple) -> None:
    """One request's access line, from its fields (method, route, status, seconds, inputs, body bytes)."""
    sink = _sink
    if sink is None:
        log(fields)
    else:
        sink(fields)


def text(fields: tuple) -> str:
    """The JSON access line of these fields."""
    method, route, status, seconds, inputs, size = fields
    return json.dumps({"method": method, "route": route, "status": status, "ms": round(1000 * seconds, 2),
                       "images": inputs, "bytes": size})


def log(fields: tuple) -> None:
    """Log the access line of these fields."""
    ACCESS.info(text(fields))


def record(fields: tuple) -> logging.LogRecord:
    """The access logger's record of these fields, as `log` would make it (for a writer that holds the handlers)."""
    return ACCESS.makeRecord(ACCESS.name, logging.INFO, __file__, 0, text(fields), (), None)


def defer_to(sink: Callable[[tuple], None] | None) -> None:
    """Hand every access line's fields to `sink` (a log writer's queue), or log them at once again (None)."""
    global _sink  # one process, one log writer
    _sink = sink
