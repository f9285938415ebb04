"""The production gunicorn worker: gevent reads every request whole, a pool of native threads runs the app.

gunicorn's gthread worker hands a connection to one of its few app threads as soon as the first byte arrives,
and that thread then reads the rest of the head and the body itself: 8 clients sending 1 byte/s held all 4
threads and a normal client waited. This worker keeps gthread's model where it matters (the Flask app runs on
`threads` native threads, so ONNX Runtime, Pillow and numpy overlap as before) and does the reading the way a
buffering proxy does, on gunicorn's gevent worker (one greenlet per connection, up to `worker_connections`):

- a request head must arrive within `keepalive` seconds (gunicorn's async workers bound each head read by it),
  otherwise the connection is closed;
- the body is read into memory before the app sees the request, within TORCHFERRY_BODY_TIMEOUT seconds of the
  head (default 15); a body that is late gets a JSON 408 and the connection is closed;
- bodies past the app's upload limit are not read: the app answers 413 from what it was given, and the
  connection is closed, since the rest of that body is still on it;
- the bytes all connections of a worker have buffered are bounded (2 × threads × the upload limit); a
  connection whose next chunk would exceed it waits, so memory is held to that whatever the clients send (and
  one upload limit more: the body that began first always goes on, so the bodies waiting for room complete).

Nothing is monkey-patched: the app's threads (model watcher, micro-batcher, request threads) are real threads,
and they never touch a gevent socket (the app reads its body from memory).
"""

from __future__ import annotations

import io
import json
import logging
import queue
import signal
import sys
import threading
from logging.handlers import QueueHandler, QueueListener

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.threadpool import ThreadPool
from gunicorn.workers.ggevent import GeventWorker

from torchferry.serve import accesslog
from torchferry.serve.settings import GunicornSettings

READ_STEP = 64 * 1024
DEFAULT_UPLOAD_LIMIT = 16 * 1024 * 1024
# The hub's thread does every connection's reading and writing; with Python's default GIL switch interval (5 ms)
# it waits that long behind a busy app thread each time. Measured (bench/slow_clients.py's 4-client smallcnn
# throughput, interleaved with gthread on 2 cores): 0.88x gthread at 5 ms, 0.94x at 0.5 ms.
SWITCH_INTERVAL_S = 0.0005
# How often a worker's log writer wakes to write the lines queued since (serve/gunicorn.conf.py's post_fork).
LOG_WRITE_INTERVAL_S = 0.05


class BodyTimeout(Exception):
    """The request body did not arrive in time."""


class ByteBudget:
    """Bytes that request bodies may hold in one worker; greenlets wait for room (all on the hub's thread).

    The body that began first always takes its next chunk: it completes and frees its bytes, so bodies that
    together pass the budget do not each wait for another to free room (five 15 MiB uploads at once, with 2 threads,
    all ended in 408 that way). The bytes held stay within the budget plus that one body's.
    """

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._held: dict[object, int] = {}  # each body's bytes, in the order the bodies began
        self._freed = Event()

    def take(self, body: object, n: int) -> None:
        """Hold `n` more bytes for `body`, once there is room or `body` is the first of those holding some."""
        while self.used and self.used + n > self.total and next(iter(self._held)) is not body:
            self._freed.clear()
            self._freed.wait()
        self.used += n
        self._held[body] = self._held.get(body, 0) + n

    def give(self, body: object) -> None:
        """Free all that `body` holds."""
        self.used -= self._held.pop(body, 0)
        self._freed.set()


class BufferingWorker(GeventWorker):
    """gunicorn worker class `torchferry.serve.worker.BufferingWorker` (torchferry/serve/gunicorn.conf.py sets it)."""

    def init_signals(self) -> None:
        """gunicorn's handlers, and SIGHUP remembered while the app loads its model (by default it would end the
        worker): post_worker_init (torchferry/serve/gunicorn.conf.py) hands it on to the model watcher once loaded."""
        super().init_signals()
        self.reload_requested = False
        signal.signal(signal.SIGHUP, self._remember_hup)
        signal.siginterrupt(signal.SIGHUP, False)

    def _remember_hup(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    def patch(self) -> None:
        # Only the listening sockets become gevent sockets (what gunicorn's gevent worker does after patch_all);
        # the standard library stays unpatched so that the app's threads are native threads.
        self.sockets = [gsocket.socket(s.FAMILY, gsocket.SOCK_STREAM, fileno=s.sock.detach()) for s in self.sockets]

    def run(self) -> None:
        self.body_timeout = GunicornSettings.load().body_timeout
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        config = getattr(self.wsgi, "config", {}) or {}
        self.upload_limit = int(config.get("MAX_CONTENT_LENGTH") or DEFAULT_UPLOAD_LIMIT)
        self.budget = ByteBudget(2 * max(1, self.cfg.threads) * (self.upload_limit + 1))
        self.app_threads = ThreadPool(max(1, self.cfg.threads))
        app = self.wsgi
        self.wsgi = lambda environ, start_response: self.app_threads.apply(app, (environ, start_response))
        super().run()

    def handle_request(self, listener_name, req, sock, addr):
        try:
            try:
                with gevent.Timeout(self.body_timeout, BodyTimeout):
                    self._buffer_body(req, sock)
            except BodyTimeout:
                self._answer_timeout(req, sock)
                raise StopIteration() from None
            out = HeadWithBody(sock)
            try:
                return super().handle_request(listener_name, req, out, addr)
            finally:
                out.flush()
        finally:
            self.budget.give(req)

    def _buffer_body(self, req, sock) -> None:
        """Read the body into memory (at most the upload limit + 1 bytes), its bytes held from the budget until the
        request is answered."""
        declared = _content_length(req)
        if declared is not None and declared > self.upload_limit:
            req.body, req.must_close = io.BytesIO(b""), True  # the app answers 413 from the header
            req._expected_100_continue = False  # and the client is not asked to send the body first
            return
        if getattr(req, "_expected_100_continue", False):
            # The client waits for this before it sends the body (curl does for bodies over 1 MB); gunicorn would
            # send it only when the app starts, after this read, so it is sent here and not again.
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            req._expected_100_continue = False
        want = self.upload_limit + 1 if declared is None else declared
        chunks, held = [], 0
        while held < want:
            step = min(READ_STEP, want - held)
            self.budget.take(req, step)
            held += step
            data = req.body.read(step)
            if not data:
                break
            chunks.append(data)
        body = b"".join(chunks)
        if len(body) > self.upload_limit:
            req.must_close = True  # the rest of an over-long chunked body is still on the connection
        req.body = io.BytesIO(body)

    def _answer_timeout(self, req, sock) -> None:
        message = f"the request body did not arrive within {self.body_timeout:g} s"
        if req.path == "/v2" or req.path.startswith("/v2/"):
            payload = {"error": message}
        else:
            payload = {"error": {"code": "request_timeout", "message": message}}
        body = json.dumps(payload).encode()
        head = (f"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        self.log.info("408 %s %s: body not complete in %g s", req.method, req.path, self.body_timeout)
        try:
            sock.sendall(head + body)
        except OSError:
            pass


class LineQueue(QueueHandler):
    """The request threads' log handler: a record goes on the queue as it is; the writer formats it."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # QueueHandler.prepare formats and copies the record so that it can cross a process; a thread needs neither,
        # and the access line's record holds only the JSON string it was given.
        return record


class PeriodicWriter(QueueListener):
    """Writes what the request threads queued, every `interval` seconds, all of it, and all that is left at `stop`.

    The standard library's QueueListener wakes on every line: under load, a second thread then wants the GIL after
    each request (a handoff at the switch interval each time, while the hub and the app threads wait). Lines written
    this way are late by at most `interval`, and never reordered.
    """

    def __init__(self, lines: queue.SimpleQueue, *handlers: logging.Handler, interval: float = LOG_WRITE_INTERVAL_S,
                 logger: logging.Logger | None = None):
        super().__init__(lines, *handlers, respect_handler_level=True)
        self.interval, self.logger = interval, logger  # whose handlers these were: given back at `stop`
        self._stopping = threading.Event()

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._write_every_interval, name="torchferry-log-writer", daemon=True)
        self._thread.start()

    def _write_every_interval(self) -> None:
        while not self._stopping.wait(self.interval):
            self.write_queued()
        self.write_queued()

    def write_queued(self) -> None:
        """Write every line queued now, in order; an access line's fields (serve/accesslog.py) become its record
        here."""
        while True:
            try:
                record = self.queue.get_nowait()
            except queue.Empty:
                return
            if type(record) is tuple:
                try:
                    record = accesslog.record(record)
                except Exception as exc:  # noqa: BLE001 - one bad line must not end the writer and every later line
                    print(f"torchferry: an access line could not be written ({exc!r})", file=sys.stderr)
                    continue
            self.handle(record)

    def stop(self) -> None:
        """Write what is queued and end the writer; its logger gets its handlers back, so later lines are written
        in place, then whatever was queued meanwhile."""
        if self._thread is not None:
            self._stopping.set()
            self._thread.join()
            self._thread = None
        if self.logger is not None:
            self.logger.handlers = list(self.handlers)
            self.write_queued()


def queue_log_lines(root: logging.Logger, interval: float = LOG_WRITE_INTERVAL_S) -> PeriodicWriter:
    """Route `root`'s records through a queue to a started PeriodicWriter holding its handlers (stop it at exit)."""
    lines: queue.SimpleQueue = queue.SimpleQueue()
    writer = PeriodicWriter(lines, *root.handlers, interval=interval, logger=root)
    root.handlers = [LineQueue(lines)]
    writer.start()
    return writer


class HeadWithBody:
    """A connection's socket as gunicorn's response writes to it: the response head (always its first `sendall`) is
    held until the first body bytes, so that both leave in one send, one system call and, for a small JSON answer,
    one TCP segment instead of two. Anything else asked of the socket (`fileno` for sendfile, `close`, ...) first
    sends what is held, so nothing is reordered."""

    def __init__(self, sock):
        self._sock, self._head, self._started = sock, b"", False

    def sendall(self, data: bytes) -> None:
        if not self._started:  # the head: gunicorn writes it whole, before any body bytes
            self._head, self._started = bytes(data), True
            return
        data, self._head = self._head + data if self._head else data, b""
        self._sock.sendall(data)

    def flush(self) -> None:
        """Send a head still held (a response without body bytes)."""
        if self._head:
            head, self._head = self._head, b""
            self._sock.sendall(head)

    def __getattr__(self, name: str):
        self.flush()
        return getattr(self._sock, name)


def _content_length(req) -> int | None:
    for name, value in req.headers:
        if name == "CONTENT-LENGTH":
            try:
                return int(value)
            except ValueError:
                return None
    return None
