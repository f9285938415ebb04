"""gunicorn settings for production: `gunicorn -c torchferry/serve/gunicorn.conf.py`.

Environment: the settings of serve/settings.py, `GunicornSettings` for the processes (TORCHFERRY_BIND, default
127.0.0.1:8080, the container sets 0.0.0.0:8080; TORCHFERRY_WORKERS, default 1; TORCHFERRY_THREADS per worker,
default 2; TORCHFERRY_GRACEFUL_TIMEOUT, seconds in-flight requests get after SIGTERM, default 30;
TORCHFERRY_BODY_TIMEOUT, seconds a request body may take after its head, default 15, then 408;
TORCHFERRY_WORKER_CONNECTIONS, default 1000; TORCHFERRY_TIMEOUT, TORCHFERRY_WORKER_TMP_DIR,
TORCHFERRY_LOG_LEVEL) and `ServeSettings` for the app (TORCHFERRY_ORT_THREADS defaults here to the cores
divided among the workers, so workers × ORT threads never oversubscribe the machine). PROMETHEUS_MULTIPROC_DIR
turns on prometheus_client's multiprocess mode.

Slow clients: the worker class (serve/worker.py) reads every request whole on gevent before one of the app's
native threads takes it, so connections that send 1 byte/s cost a greenlet each, never an app thread.
Dying workers: each worker loads and proves its model before it accepts (wsgi_app below), so a worker that
starts or replaces a killed one takes no request it would answer 503; until then the other workers answer, or,
with none ready, connections wait in the listen queue.

SIGHUP to the master means what it means to `python -m serve`: every worker looks for a new model version,
loads and proves it in the background while it keeps answering with the old one, then swaps (serve/repository.py).
gunicorn's own SIGHUP (start new workers, stop the old ones at once) would send requests to workers whose model
is still loading (503s); here it is replaced by forwarding the signal to the workers. To restart the workers,
restart the server (a rolling update in Kubernetes).
"""

import os
import shutil
import signal
import tempfile

from torchferry.serve.device import REFUSAL_MARK_ENV, is_gpu
from torchferry.serve.settings import exit_on_bad_settings

# Every TORCHFERRY_* setting, read and checked once (serve/settings.py); one that cannot work: one line, exit 2,
# before any worker starts.
_settings, _app_settings = exit_on_bad_settings()
# The model is loaded and proven inside create_app, before the worker accepts: a worker that starts or is
# restarted takes no connection it would answer 503, so ready means every accepting worker can answer.
# A GPU (TORCHFERRY_DEVICE) whose provider is missing stopped the server above; one whose session falls back to the
# CPU ends the worker with one line and gunicorn's boot-error status, and the master stops (serve/device.py).
wsgi_app = "torchferry.serve.app:gunicorn_app()"
bind = _settings.bind
workers = _settings.workers
threads = _settings.threads
# gevent reads each request whole (head within `keepalive` s, body within TORCHFERRY_BODY_TIMEOUT s, else 408),
# then one of `threads` native threads runs the app: slow clients hold a greenlet, never an app thread.
worker_class = "torchferry.serve.worker.BufferingWorker"
worker_connections = _settings.worker_connections
# SIGTERM: stop accepting, let requests in flight finish for up to graceful_timeout seconds.
graceful_timeout = _settings.graceful_timeout
timeout = _settings.timeout
keepalive = 5
# Heartbeat files in memory: works with a read-only root filesystem and never stalls on a slow disk.
worker_tmp_dir = _settings.worker_tmp_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
preload_app = False  # each worker builds its own ONNX Runtime session after the fork, before it accepts
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
accesslog = None  # the app writes one JSON line per request itself
# No control socket (gunicorn 25.1+ opens $XDG_RUNTIME_DIR or $HOME/.gunicorn/gunicorn.ctl by default for gunicornc:
# show the config, add or kill workers, shut down): the server is run by signals (SIGHUP, SIGTERM, README), a
# second server on the machine would take over the first one's socket at the same path, and a read-only root
# file system has no $HOME to write it to.
control_socket_disable = True
errorlog = "-"
loglevel = _settings.log_level

# ONNX Runtime threads per worker, unless set: the cores divided among the workers, so that workers × ORT
# threads never oversubscribe the machine.
_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_ort_threads = _app_settings.ort_threads
raw_env = [f"TORCHFERRY_ORT_THREADS={max(1, _cores // workers) if _ort_threads is None else _ort_threads}"]
# A GPU whose session falls back to the CPU fails every worker alike: only the first to fail (the one that creates
# this file) says so and exits with gunicorn's boot-error status, and the master stops (serve/app.py).
_refusals = tempfile.mkdtemp(prefix="torchferry-refusals-") if is_gpu(_app_settings.device) else None
if _refusals:
    raw_env.append(f"{REFUSAL_MARK_ENV}={os.path.join(_refusals, 'refused')}")


def on_exit(server):
    """Master: the refusal mark's folder goes with the server."""
    if _refusals:
        shutil.rmtree(_refusals, ignore_errors=True)


def on_starting(server):
    """An empty multiprocess metrics folder at start, so old workers' figures do not linger."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            if name.endswith(".db"):
                os.unlink(os.path.join(folder, name))


def when_ready(server):
    """Master: SIGHUP re-checks the model in place in every worker instead of replacing the workers."""

    def forward_hup():
        server.log.info("SIGHUP: every worker looks for a new model version and swaps it in once proven")
        server.kill_workers(signal.SIGHUP)

    server.handle_hup = forward_hup


def post_worker_init(worker):
    """Worker: SIGHUP (forwarded by the master) wakes the app's model watcher; by default it would kill the worker."""
    worker.model_loaded.set()
    repo = worker.wsgi.extensions["torchferry"]
    signal.signal(signal.SIGHUP, lambda signum, frame: repo.request_reload())
    signal.siginterrupt(signal.SIGHUP, False)
    if getattr(worker, "reload_requested", False):  # a SIGHUP came while the model loaded (serve/worker.py)
        repo.request_reload()


# glibc's M_MMAP_THRESHOLD (mallopt's parameter -3): buffers of at least this many bytes are mapped on their own and
# given back to the system when freed. glibc would raise the threshold after the first large free (up to 32 MiB),
# keeping later large buffers in the threads' heaps: after a 40 MP image, a 15 MiB body then took 50 MiB more over
# the worker's idle size (the hostile corpus in tests/test_serve_hostile.py: 338-384 MiB, 328 with these settings).
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 32 << 20


def return_large_buffers_to_the_system() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES in this process (nothing where the C library is not glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, MMAP_THRESHOLD_BYTES)
    # M_TRIM_THRESHOLD (-1): a fixed mmap threshold also fixes this one at its 128 KiB default, and the heaps would be
    # given back and grown again on every request (5 % of the requests/s of small images); 32 MiB is glibc's own cap.
    libc.mallopt(-1, TRIM_THRESHOLD_BYTES)


def post_fork(server, worker):
    """JSON access lines from the app reach gunicorn's error log stream (stderr), written by a thread of their own;
    a heartbeat while the model loads; a request's large buffers go back to the system when it ends."""
    import logging
    import threading

    from torchferry.serve import accesslog
    from torchferry.serve.worker import queue_log_lines

    return_large_buffers_to_the_system()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # A request thread only puts its lines on a queue (the standard library's pattern for threads that must not
    # wait on I/O); one writer thread takes the stream handler's lock and writes them, every 50 ms rather than on
    # every line (serve/worker.py's PeriodicWriter). worker_exit writes what is left.
    worker.log_listener = queue_log_lines(logging.getLogger())
    # A request thread only queues its access line's fields: the writer makes the JSON line and its record, when
    # that record would go to the root's handlers alone (no --log-config gave the access logger its own).
    if accesslog.routes_to_root():
        accesslog.defer_to(worker.log_listener.queue.put)
    # The model loads before the worker's own loop starts beating (wsgi_app): beat for it meanwhile, so that a
    # model that takes longer than `timeout` to load and prove is not killed as a hung worker.
    worker.model_loaded = threading.Event()

    def beat() -> None:
        while not worker.model_loaded.wait(1.0):
            worker.notify()

    threading.Thread(target=beat, name="torchferry-load-heartbeat", daemon=True).start()


def worker_exit(server, worker):
    """Worker: write the log lines still queued before the process ends."""
    listener = getattr(worker, "log_listener", None)
    if listener is not None:
        from torchferry.serve import accesslog

        accesslog.defer_to(None)
        listener.stop()


def child_exit(server, worker):
    """Drop a dead worker's live gauges from the multiprocess metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
