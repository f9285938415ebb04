"""The same work as a Ray Serve deployment with 2 replicas, on a local Ray that binds 127.0.0.1 only.

    PEER_MODEL=model.onnx PEER_PORT=8000 python -m bench.peers.rayserve_app     # POST /predict, raw image body

The script starts Ray (2 CPUs, no dashboard, node address 127.0.0.1), Serve's proxy on 127.0.0.1:PEER_PORT and
the deployment, then waits for SIGTERM or SIGINT and shuts Ray down. Run by `python -m bench.peers` in its own venv
(bench/peers/requirements-rayserve.txt).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

# Ray's switch for single-machine clusters: its node address stays 127.0.0.1, so every server it starts (GCS,
# raylet, agents, workers) binds to loopback only (torchferry/distributed/cluster.py does the same). It must be set
# before Ray is imported; the processes Ray starts inherit it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray
from ray import serve
from starlette.requests import Request

from bench.peers.classify import Classifier, ort_threads

WORKERS = int(os.environ.get("PEER_WORKERS", "2"))


def _replica_grpc_on_loopback() -> None:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on [::] (every interface), with no setting
    to change it: bind it to 127.0.0.1. Runs when a replica's process imports this module to build the deployment,
    before that server starts."""
    from ray.serve._private import replica

    add = replica.add_port_to_grpc_server
    replica.add_port_to_grpc_server = lambda server, address: add(server, address.replace("[::]", "127.0.0.1"))


_replica_grpc_on_loopback()


class ClassifyReplica:
    """POST /predict: an image body → its top-5 classes as JSON."""

    def __init__(self, model: str) -> None:
        self.classifier = Classifier(model, ort_threads(WORKERS))

    async def __call__(self, request: Request) -> dict[str, Any]:
        return self.classifier.classify(await request.body())


# The class keeps its own module-level name, so that Ray sends it to the replicas by reference (they import this
# module, and its loopback patch above) rather than by value.
Classify = serve.deployment(num_replicas=WORKERS, ray_actor_options={"num_cpus": 0})(ClassifyReplica)


def main() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["PEER_PORT"])})
    # By its module's name, not __main__'s: the replicas then import the module (and its loopback patch above)
    # instead of receiving the class by value.
    from bench.peers.rayserve_app import Classify as deployment

    serve.run(deployment.bind(os.environ["PEER_MODEL"]), route_prefix="/predict")
    print("ready", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
