"""torchferry's server against the servers a user would pick instead, doing the same work (python -m bench.peers).

Each peer is a small app here (flask_app.py, litserve_app.py, bentoml_service.py, rayserve_app.py) around the same
decode, preprocessing and ONNX Runtime call (classify.py), run from its own venv (requirements-<name>.txt, created
by `python -m bench.peers --setup` under ~/.cache/torchferry/peers). Nothing here is imported by torchferry or run
by the test suite beyond a check that needs no venv.
"""
