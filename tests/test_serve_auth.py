"""serve/auth.py: bearer-token authentication, off by default, on with one setting, probes exempt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import png

from torchferry.serve.app import create_app
from torchferry.serve.auth import BearerAuth

TOKEN = "s3cret-token-0123456789abcdef"


# (method, path, kwargs): every route that needs the token once one is configured.
PROTECTED = [
    ("post", "/predict", {"data": png(), "content_type": "image/png"}),
    (
        "post",
        "/v2/models/smallcnn/infer",
        {"json": {"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.0] * 768}]}},
    ),
    ("get", "/metadata", {}),
    ("get", "/v2/models/smallcnn", {}),
    ("get", "/v2/models/smallcnn/ready", {}),
    ("get", "/v2", {}),
    ("get", "/metrics", {}),
]
PROBES = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"]


@pytest.fixture
def client(exported_model: dict):
    """The app on the trained model with TORCHFERRY_AUTH_TOKEN's setting."""
    return create_app({"MODEL": str(exported_model["model"]), "LOAD_SYNC": True, "AUTH_TOKEN": TOKEN}).test_client()


@pytest.mark.parametrize("method,path,kwargs", PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_protected_route_needs_the_right_token(client, method: str, path: str, kwargs: dict) -> None:
    call = getattr(client, method)
    missing = call(path, **kwargs)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == 'Bearer realm="torchferry"'
    wrong = call(path, headers={"Authorization": "Bearer not-the-token"}, **kwargs)
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    other_scheme = call(path, headers={"Authorization": f"Basic {TOKEN}"}, **kwargs)
    assert other_scheme.status_code == 401
    for r in (missing, wrong):  # each family's own error shape
        if path.startswith("/v2"):
            assert set(r.json) == {"error"} and isinstance(r.json["error"], str)
        else:
            assert r.json["error"]["code"] == "unauthorized"
    right = call(path, headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)
    assert right.status_code == 200, right.data[:300]
    assert call(path, headers={"Authorization": f"bearer  {TOKEN} "}, **kwargs).status_code == 200


@pytest.mark.parametrize("path", PROBES)
def test_probes_answer_without_a_token(client, path: str) -> None:
    assert client.get(path).status_code == 200


def test_unknown_routes_are_401_before_404(client) -> None:
    assert client.get("/nope").status_code == 401
    assert client.get("/nope", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_auth_is_off_without_a_token(exported_model: dict, caplog: pytest.LogCaptureFixture) -> None:
    client = create_app({"MODEL": str(exported_model["model"]), "LOAD_SYNC": True}).test_client()
    assert client.get("/metadata").status_code == 200
    assert "authentication is off" in caplog.text  # said out loud, once per process


@pytest.mark.parametrize("variable", ["TORCHFERRY_AUTH_TOKEN", "TORCHFERRY_AUTH_TOKEN_FILE"])
def test_an_empty_token_setting_stops_the_server_instead_of_turning_auth_off(
    exported_model: dict, variable: str
) -> None:
    # A Secret key with no value, or a compose file's ${TOKEN} with TOKEN unset, gives an empty variable.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHFERRY_AUTH_")} | {variable: ""}
    done = subprocess.run([sys.executable, "-m", "serve", "--model", str(exported_model["model"]), "--port", "1"],
                          cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and f"{variable} is" in done.stderr and "empty" in done.stderr, done.stderr[-500:]


def test_token_file_is_read_and_a_rotated_secret_takes_effect(tmp_path: Path) -> None:
    # Kubernetes mounts a Secret key as a symlink into a timestamped folder and swaps the link on update.
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "token").write_text("first-token\n")
    (tmp_path / "token").symlink_to(tmp_path / "v1" / "token")
    auth = BearerAuth(token_file=str(tmp_path / "token"))
    assert auth.enabled and auth.check("Bearer first-token") is None
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "token").write_text("second-token")
    (tmp_path / "next").symlink_to(tmp_path / "v2" / "token")
    os.replace(tmp_path / "next", tmp_path / "token")
    assert auth.check("Bearer second-token") is None and auth.check("Bearer first-token")[0] == "invalid_token"
    os.unlink(tmp_path / "token")  # unreadable later: the last token stays in force, never none
    assert auth.check("Bearer second-token") is None and auth.check(None) is not None


@pytest.mark.parametrize(
    "setup,message",
    [
        ("both", "not both"),
        ("empty file", "is empty"),
        ("missing file", "No such file"),
        ("two words", "whitespace"),
    ],
)
def test_a_misconfigured_token_stops_the_server_from_starting(tmp_path: Path, setup: str, message: str) -> None:
    path = tmp_path / "token"
    if setup == "empty file":
        path.write_text("\n")
    elif setup == "two words":
        path.write_text("two words")
    config = {"MODEL": None, "LOAD_SYNC": True, "AUTH_TOKEN_FILE": str(path)}
    if setup == "both":
        config["AUTH_TOKEN"] = TOKEN
    with pytest.raises(ValueError, match=message):
        create_app(config)
