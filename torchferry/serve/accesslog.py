"""The server's JSON access line, one per request: method, route, status, ms, inputs, body bytes.

A request's thread hands the line's fields to `line`. By default they are logged there and then; under gunicorn
(torchferry/serve/gunicorn.conf.py's post_fork) they go to the worker's log writer queue (serve/worker.py), whose
thread makes the JSON line and its log record. Inside a worker under load those two took about 35 µs a request
(json.dumps 14, the log record 22: about 2 % of a small image's request), spent now after the answer has left.
"""

from __future__ import annotations

import json
import logging
import time
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
        sink((*fields, time.time()))


def text(fields: tuple) -> str:
    """The JSON access line of these fields."""
    method, route, status, seconds, inputs, size = fields[:6]
    return json.dumps({"method": method, "route": route, "status": status, "ms": round(1000 * seconds, 2),
                       "images": inputs, "bytes": size})


def log(fields: tuple) -> None:
    """Log the access line of these fields."""
    ACCESS.info(text(fields))


def record(fields: tuple) -> logging.LogRecord:
    """The access logger's record of deferred fields, as `log` would have made it when the request ended (the
    fields' last item): for a writer that holds the root logger's handlers (`routes_to_root`)."""
    rec = ACCESS.makeRecord(ACCESS.name, logging.INFO, __file__, 0, text(fields), (), None)
    created = fields[-1]
    rec.relativeCreated -= (rec.created - created) * 1000
    rec.created, rec.msecs = created, int((created - int(created)) * 1000) + 0.0
    return rec


def routes_to_root() -> bool:
    """Whether an access record reaches the root logger's handlers and no others: no filters on the access logger,
    and no handlers of their own (nor a stop to propagation) on it or the loggers above it (a --log-config can set
    them). Only then may a writer holding the root's handlers write the record in the logger's stead."""
    logger: logging.Logger | None = ACCESS
    if ACCESS.filters:
        return False
    while logger is not None and logger.parent is not None:
        if logger.handlers or not logger.propagate:
            return False
        logger = logger.parent
    return True


def defer_to(sink: Callable[[tuple], None] | None) -> None:
    """Hand every access line's fields (and the time) to `sink` (a log writer's queue), or log them at once (None)."""
    global _sink  # one process, one log writer
    _sink = sink
