"""Batch prediction (`python -m serve.batch`): a folder, a list file or a bucket scored on Ray Data with the server's
own decoding, preprocessing and predictor; bad files are rows, not failures; output parts are whole or absent; a
second run skips what the output already holds. One real Ray run (slow); everything else is in-process."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import REPO, colour_image, jpeg, multipart, png, png_bomb, red
from PIL import Image

from torchferry.batch import command, output, run
from torchferry.batch.command import BatchConfig
from torchferry.batch.output import OutputFolder, error_rows, read_paths, rows_table
from torchferry.batch.scorer import load_proven, score
from torchferry.batch.sources import resolve
from torchferry.serve.predictor import read_model_file


def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "join_or_start_ray", lambda *a, **k: pytest.fail("Ray must not start"))


def _failing_proof(model: Path, tmp_path: Path) -> Path:
    proto = onnx.load(str(model))
    for prop in proto.metadata_props:
        if prop.key == "golden":
            golden = json.loads(prop.value)
            golden["logits"][0][0] += 0.5
            prop.value = json.dumps(golden)
    onnx.save(proto, str(tmp_path / "bad-proof.onnx"))
    return tmp_path / "bad-proof.onnx"


def _bad_inputs(model: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    images, empty, file_out, foreign = tmp_path / "images", tmp_path / "empty", tmp_path / "out.txt", tmp_path / "f"
    images.mkdir()
    png_path = images / "a.png"
    png_path.write_bytes(png(red()))
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image file name")
    file_out.write_text("x")
    foreign.mkdir()
    (foreign / "keep.me").write_text("someone's file")
    with zipfile.ZipFile(tmp_path / "best.pth", "w") as checkpoint:  # torch.save writes a zip archive
        checkpoint.writestr("best/data.pkl", b"\x80\x02}q\x00.")
    ok = ["--model", str(model), "--input", str(images)]
    return {
        "checkpoint for the model": (["--model", str(tmp_path / "best.pth"), "--input", str(images), "--output",
                                      str(tmp_path / "o0")], "best.pth is a PyTorch checkpoint, not an ONNX model"),
        "missing model": (["--model", str(tmp_path / "nope.onnx"), "--input", str(images), "--output",
                           str(tmp_path / "o1")], "does not exist"),
        "model failing its proof": (["--model", str(_failing_proof(model, tmp_path)), "--input", str(images),
                                     "--output", str(tmp_path / "o2")], "golden outputs do not reproduce"),
        "missing input": (["--model", str(model), "--input", str(tmp_path / "nothing"), "--output",
                           str(tmp_path / "o3")], "does not exist"),
        "empty folder": (["--model", str(model), "--input", str(empty), "--output", str(tmp_path / "o4")],
                         "holds no image files"),
        "output is a file": ([*ok, "--output", str(file_out)], "is a file"),
        "output holds other files": ([*ok, "--output", str(foreign)], "holds other files"),
        "output under a file": ([*ok, "--output", str(file_out / "sub")], "cannot write"),
        "zero actors": ([*ok, "--output", str(tmp_path / "o5"), "--actors", "0"], "--actors 0"),
        "zero top-k": ([*ok, "--output", str(tmp_path / "o6"), "--top-k", "0"], "--top-k 0"),
        "unsupported URI": ([*ok[:2], "--input", "nosuch://bucket/x", "--output", str(tmp_path / "o7")],
                            "cannot open"),
    }


@pytest.mark.parametrize("case", ["checkpoint for the model", "missing model", "model failing its proof", "missing input", "empty folder",
                                  "output is a file", "output holds other files", "output under a file",
                                  "zero actors", "zero top-k", "unsupported URI"])
def test_bad_input_is_one_line_and_exit_2_before_ray_starts(case: str, exported_model: dict, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    _no_ray(monkeypatch)
    argv, expected = _bad_inputs(exported_model["model"], tmp_path)[case]
    assert command.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "f" / output.MANIFEST).exists()  # another folder is never claimed


def test_a_resumed_run_must_use_the_model_top_k_and_format_that_wrote_the_output(
        exported_model: dict, tmp_path: Path) -> None:
    identity = {"model_sha256": "a" * 64, "top_k": 3, "output_format": "parquet"}
    assert OutputFolder(str(tmp_path / "o"), "parquet", identity).open() == set()
    for changed in ({"top_k": 2}, {"model_sha256": "b" * 64}):
        with pytest.raises(command.TorchferryError, match="resume with the same model"):
            OutputFolder(str(tmp_path / "o"), "parquet", {**identity, **changed}).open()
    (tmp_path / "o" / output.MANIFEST).write_text("{not json")
    with pytest.raises(command.TorchferryError, match="cannot be read"):
        OutputFolder(str(tmp_path / "o"), "parquet", identity).open()


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_part_files_are_whole_or_absent_and_read_back(fmt: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.dataset as pads

    identity = {"model_sha256": "a" * 64, "top_k": 2, "output_format": fmt}
    out = OutputFolder(str(tmp_path / "o"), fmt, identity)
    out.open()
    answers = [{"label": "red", "score": 0.9, "top_k": [{"label": "red", "score": 0.9}, {"label": "b|,\"", "score": 0.1}]}]
    rows = output.answer_rows(["/x/a.png"], answers)
    bad = error_rows(["/x/b.png"], ["not_an_image"], ["/x/b.png: not a recognised image"])
    out.write(rows_table({k: rows[k] + bad[k] for k in rows}))
    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)  # the part is written, then cannot be renamed into place
    with pytest.raises(OSError):
        out.write(rows_table(rows))
    monkeypatch.undo()
    names = sorted(os.listdir(tmp_path / "o"))
    assert [n for n in names if n.startswith("part-")] == [os.path.basename(out.written[0])], names
    assert not [n for n in names if n.endswith(".tmp")], names  # the failed part left nothing behind
    assert OutputFolder(str(tmp_path / "o"), fmt, identity).open() == {"/x/a.png", "/x/b.png"}
    table = pads.dataset(str(tmp_path / "o"), format=fmt).to_table()  # the folder reads as one table
    got = {r["path"]: r for r in table.to_pylist()}
    labels = got["/x/a.png"]["labels"]
    assert (json.loads(labels) if fmt == "csv" else labels) == ["red", "b|,\""]
    assert got["/x/b.png"]["error"] == "not_an_image" and got["/x/b.png"]["label"] in (None, "")  # CSV: empty
    assert read_paths(out.written[0], fmt) == ["/x/a.png", "/x/b.png"]


def test_sources_folder_and_list_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub" / ".hidden").mkdir(parents=True)
    for rel in ("a.png", "sub/b.JPG", "sub/.c.png", "sub/.hidden/d.png", "notes.txt"):
        (root / rel).write_bytes(b"x")
    found = [e.path for e in resolve(str(root), (".png", ".jpg")).entries]
    assert found == [str(root / "a.png"), str(root / "sub" / "b.JPG")]
    assert len(resolve(f"file://{root}", ()).entries) == 3  # every file but the hidden ones
    listing = tmp_path / "lists" / "files.txt"
    listing.parent.mkdir()
    listing.write_text(f"# images\n../data/a.png\n\n{root}/sub/b.JPG\nfile://{root}/a.png\n../data/gone.png\n")
    source = resolve(str(listing), ())
    assert [(e.path, e.size) for e in source.entries] == [(str(root / "a.png"), 1), (str(root / "sub" / "b.JPG"), 1),
                                                          (str(root / "gone.png"), None)]
    listing.write_text("s3://bucket/a.png\n")
    with pytest.raises(command.TorchferryError, match="another file system"):
        resolve(str(listing), ())


def test_files_refused_unread_missing_or_too_large(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(b"x" * 101)
    (tmp_path / "ok.png").write_bytes(b"x" * 100)
    (tmp_path / "list.txt").write_text("big.png\nok.png\ngone.png\ndone.png\n")
    (tmp_path / "done.png").write_bytes(b"x")
    source = resolve(str(tmp_path / "list.txt"), ())
    skipped, todo, refused = run.split_entries(source, {str(tmp_path / "done.png")}, max_bytes=100)
    assert [e.path for e in skipped] == [str(tmp_path / "done.png")]
    assert [e.path for e in todo] == [str(tmp_path / "ok.png")]
    assert refused["error"] == ["too_large", "not_found"] and "over the limit of 100 bytes" in refused["reason"][0]


def test_an_actor_reads_its_files_and_records_those_it_cannot(tmp_path: Path) -> None:
    from pyarrow import fs as pafs

    from torchferry.batch.scorer import read_files

    (tmp_path / "ok.png").write_bytes(b"x" * 10)
    (tmp_path / "grown.png").write_bytes(b"x" * 11)  # grew past the limit after the driver listed it
    (tmp_path / "dir.png").mkdir()
    paths = [str(tmp_path / n) for n in ("ok.png", "gone.png", "grown.png", "dir.png")]
    names, blobs, refused = read_files(pafs.LocalFileSystem(), paths, "file://", max_bytes=10)
    assert names == [f"file://{tmp_path}/ok.png"] and blobs == [b"x" * 10]
    assert refused["error"] == ["not_found", "too_large", "unreadable"], refused
    assert refused["path"][0] == f"file://{tmp_path}/gone.png" and "11 bytes is over the limit" in refused["reason"][1]


def test_a_model_with_large_inputs_is_run_a_few_images_at_a_time(tmp_path: Path) -> None:
    """The model file chooses its input's size: a 2048 px model's 48 MiB an image made a --batch-size 64 ONNX Runtime
    call 3 GiB. Its images go in runs of --max-input-bytes (64 MiB: one image), a bad file among them, in order."""
    import hostile

    from torchferry.serve.predictor import Predictor

    predictor = Predictor(hostile.tiny_model(tmp_path / "big.onnx", size=2048))
    calls, run_model = [], predictor.run
    predictor.run = lambda batch: calls.append(len(batch)) or run_model(batch)
    files = {"a.png": png(red()), "bad.png": b"hello", "b.png": png(red()), "c.png": png(red())}
    rows = score(predictor, list(files), list(files.values()), top_k=1, max_pixels=40_000_000)
    assert calls == [1, 1, 1] and rows["path"] == ["a.png", "b.png", "c.png", "bad.png"]
    assert rows["error"] == [None, None, None, "not_an_image"] and None not in rows["label"][:3]
    calls.clear()
    score(predictor, list(files), list(files.values()), top_k=1, max_pixels=40_000_000, max_input_bytes=2**31)
    assert calls == [3]
    assert BatchConfig("m", "i", "o").max_input_bytes == 64 * 2**20
    assert command.get_args_parser().parse_args(["--model", "m", "--input", "i", "--output", "o",
                                                 "--max-input-bytes", "5"]).max_input_bytes == 5


def test_a_folder_with_linked_loops_lists_each_real_file_once(tmp_path: Path) -> None:
    """The input folder is data: a link to `..` made pyarrow's listing return every file forty times over (two such
    links: 2**40 paths, a listing that never ends); a FIFO named like an image would block its reader."""
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "a" / "x.png").write_bytes(png(red()))
    (tmp_path / "in" / "a" / "loop").symlink_to("..")
    (tmp_path / "in" / "again").symlink_to("a")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "y.png").write_bytes(png(red()))
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "outside")
    os.mkfifo(tmp_path / "in" / "a" / "pipe.png")
    (tmp_path / "in" / ".hidden.png").write_bytes(b"x")
    source = resolve(str(tmp_path / "in"), (".png",))
    assert [os.path.basename(e.path) for e in source.entries] == ["x.png", "y.png"], source.entries
    assert all(e.size == len(png(red())) for e in source.entries)


def test_scoring_gives_the_predictors_answers_and_the_servers_error_codes(exported_model: dict, client) -> None:
    data = read_model_file(str(exported_model["model"]))
    predictor = load_proven(data, "model.onnx", __import__("hashlib").sha256(data).hexdigest(), threads=1)
    rng = np.random.default_rng(3)
    files = {"red.png": png(red()), "noise.jpg": jpeg(colour_image(rng, (40, 200, 40), 40)),
             "text.png": b"hello", "bomb.png": png_bomb(), "cut.png": png(red())[:60]}
    rows = score(predictor, list(files), list(files.values()), top_k=2, max_pixels=40_000_000)
    got = {p: (label, err) for p, label, err in zip(rows["path"], rows["label"], rows["error"])}
    for name, body in files.items():
        answer = client.post("/predict?top_k=2", data=multipart([(name, body)]), content_type="multipart/form-data")
        if answer.status_code == 200:
            want = answer.json["predictions"][0]
            i = rows["path"].index(name)
            assert got[name] == (want["label"], None) and rows["labels"][i] == [t["label"] for t in want["top_k"]]
            assert np.allclose(rows["scores"][i], [t["score"] for t in want["top_k"]], rtol=0, atol=1e-9)
        else:
            assert got[name] == (None, answer.json["error"]["code"]), (name, answer.json)
    assert got["red.png"][0] == "red" and {got[n][1] for n in ("text.png", "bomb.png", "cut.png")} == {
        "not_an_image", "too_many_pixels", "corrupt_image"}


def test_bad_flag_values_are_refused() -> None:
    for field, value, flag in (("format", "xml", "--format"), ("batch_size", 0, "--batch-size"),
                               ("threads", 0, "--threads"), ("max_pixels", 7, "--max-pixels")):
        with pytest.raises(command.TorchferryError, match=flag):
            BatchConfig("m", "i", "o", **{field: value}).check()
    assert BatchConfig("m", "i", "o", extensions="PNG, .jpg").extension_list == (".png", ".jpg")
    assert BatchConfig("m", "i", "o", extensions="*").extension_list == ()


def test_the_pool_fits_the_clusters_cpus_or_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    assert run.pool_size(BatchConfig("m", "i", "o")) == 4
    assert run.pool_size(BatchConfig("m", "i", "o", threads=2)) == 2
    with pytest.raises(command.TorchferryError, match="need 6 CPUs but the Ray cluster has 4"):
        run.pool_size(BatchConfig("m", "i", "o", actors=3, threads=2))  # would wait for CPUs forever


# ------------------------------------------------------------------------------------------------
# the one real run


@pytest.mark.parametrize("address", [None, "ray://cluster:10001"])
def test_a_local_ray_gathers_no_usage_statistics_and_the_operator_wins(address,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = []

    def start(*_a, **_k):
        seen.append({key: os.environ.get(key) for key in run.LEAN_LOCAL_RAY})
        raise RuntimeError("stop here")

    monkeypatch.setattr(run, "join_or_start_ray", start)
    for operator in (None, "1"):
        for key in run.LEAN_LOCAL_RAY:
            monkeypatch.delenv(key, raising=False) if operator is None else monkeypatch.setenv(key, operator)
        with pytest.raises(RuntimeError, match="stop here"):
            run._score(BatchConfig("m", "i", "o", address=address), None, [], (b"", "", 1), None)
    local = address is None
    assert seen == [{"RAY_USAGE_STATS_ENABLED": "0" if local else None}, {"RAY_USAGE_STATS_ENABLED": "1"}]


def _write_digits(root: Path, count: int) -> dict[str, bytes]:
    """`count` small digit images (8×8 scaled to 20×20, PNG and JPEG alternately, RGB) and five bad files."""
    from sklearn.datasets import load_digits

    digits = load_digits().images
    files = {}
    for i in range(count):
        img = Image.fromarray((digits[i % len(digits)] * 255 / 16).astype("uint8")).resize((20, 20)).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "PNG" if i % 2 else "JPEG", quality=90)
        files[f"{i % 10}/{i:05d}.{'png' if i % 2 else 'jpg'}"] = buf.getvalue()
    files.update({"bad/text.png": b"not an image at all", "bad/cut.jpg": files["0/00000.jpg"][:200],
                  "bad/bomb.png": png_bomb(), "bad/empty.png": b"", "bad/big.png": png("noise", size=300)})
    for rel, body in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    return files


def _server_answers(client, files: dict[str, bytes], root: Path) -> dict[str, tuple]:
    """The app's /predict on each file's bytes: (label, top-k labels, top-k scores) or the error code."""
    answers = {}
    names = list(files)
    for start in range(0, len(names), 16):
        chunk = [n for n in names[start:start + 16] if files[n] and not n.startswith("bad/")]
        if chunk:
            r = client.post("/predict?top_k=2", data=multipart([(n, files[n]) for n in chunk]),
                            content_type="multipart/form-data")
            assert r.status_code == 200, r.json
            for n, p in zip(chunk, r.json["predictions"]):
                answers[str(root / n)] = (p["label"], [t["label"] for t in p["top_k"]], [t["score"] for t in p["top_k"]])
    for n in (n for n in names if n.startswith("bad/") and n != "bad/big.png"):
        r = client.post("/predict", data=multipart([(n, files[n])]), content_type="multipart/form-data")
        answers[str(root / n)] = r.json["error"]["code"] if r.status_code != 200 else r.json
    return answers


def _command(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "serve.batch", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.slow
def test_batch_scores_a_folder_as_the_server_does_and_resumes(exported_model: dict, client, tmp_path: Path) -> None:
    import pandas as pd
    import pyarrow.parquet as pq

    root, out = tmp_path / "images", tmp_path / "scores"
    files = _write_digits(root, 2000)
    flags = ["--model", str(exported_model["model"]), "--input", str(root), "--output", str(out), "--top-k", "2",
             "--actors", "2", "--rows-per-file", "900", "--max-image-bytes", "20000"]
    first = _command(*flags)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    server = _server_answers(client, files, root)
    refused = Counter(v for k, v in server.items() if "/bad/" in k)
    assert summary["files"] == 2005 and summary["scored"] == 2000 and summary["skipped"] == 0, summary
    assert summary["bad"] == {**refused, "too_large": 1} and "too_many_pixels" in refused, (summary, refused)
    assert "2000 scored, 5 bad" in first.stdout and "img/s" in first.stdout
    assert first.stdout.count("\n") == 1 and "bad image: " in first.stderr  # one summary line; bad files logged
    assert [pq.read_metadata(out / name).num_rows for name in summary["parts_written"]] == [900, 900, 205]

    rows = pq.read_table(out).to_pylist()  # the folder read as one table
    assert len(rows) == 2005 and len({r["path"] for r in rows}) == 2005
    for row in rows:
        want = server.get(row["path"])
        if row["error"] is not None:
            assert row["label"] is None and row["reason"].startswith(row["path"]), row
            assert want == row["error"] or (row["path"].endswith("big.png") and row["error"] == "too_large"), (row, want)
            continue
        assert (row["label"], row["labels"]) == (want[0], want[1]), (row, want)
        assert np.allclose(row["scores"], want[2], rtol=1e-6, atol=1e-7) and row["score"] == row["scores"][0], row
    assert len(pd.read_parquet(out)) == 2005  # pandas reads it too

    parts = sorted(p.name for p in out.glob("part-*"))
    second = _command(*flags)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "_summary.json").read_text())
    assert (again["scored"], again["bad_total"], again["skipped"], again["ray_started"]) == (0, 0, 2005, False)
    assert sorted(p.name for p in out.glob("part-*")) == parts and re.search(r"0 scored, 0 bad, 2005 skipped",
                                                                            second.stdout)


def test_the_summary_gives_the_pace_after_the_first_answers_only_when_there_were_others() -> None:
    few = run.Summary(files=13, skipped=0, scored=12, bad={"not_an_image": 1}, seconds=10.7, first_rows_s=9.8,
                      first_rows=13, output="scores")
    many = run.Summary(files=2000, skipped=0, scored=2000, seconds=12.0, first_rows_s=8.0, first_rows=400,
                       output="scores")
    assert few.line() == ("batch: 13 files: 12 scored, 1 bad (not_an_image 1), 0 skipped (already in the output); "
                          "1.2 img/s over 10.7 s (all in the first answers, at 9.8 s); output scores")
    assert "166.7 img/s over 12.0 s (400.0 img/s after the first answers at 8.0 s)" in many.line()
    rerun = run.Summary(files=13, skipped=13, output="scores")
    assert rerun.line() == ("batch: 13 files: 0 scored, 0 bad, 13 skipped (already in the output); nothing to "
                            "score; output scores")


def test_onnx_runtime_memory_is_capped_in_batch_runs_as_in_the_server(tmp_path: Path) -> None:
    """serve.batch's actors had no cap on ONNX Runtime's memory: a model file chooses what its graph allocates. With
    --ort-memory-bytes, a run of images past the cap is run again an image at a time, and an image that does not
    fit alone is a row with the server's error code; a model whose proof needs more is refused, naming the flag."""
    import test_serve_hostile

    from torchferry.batch.scorer import load_proven
    from torchferry.serve.predictor import ModelRefused

    path = test_serve_hostile._memory_hungry(tmp_path / "model.onnx", size=256, relu_first=True)  # 768 KiB an image
    data = Path(path).read_bytes()
    predictor = load_proven(data, path, hashlib.sha256(data).hexdigest(), 1, memory_cap=4 * 2**20)
    calls, run_model = [], predictor.run
    predictor.run = lambda batch: calls.append(len(batch)) or run_model(batch)
    files = {f"{i}.png": png(Image.new("RGB", (256, 256), (200, 10, 10))) for i in range(8)}
    rows = score(predictor, list(files), list(files.values()), top_k=1, max_pixels=40_000_000)
    assert calls == [8, 1, 1, 1, 1, 1, 1, 1, 1], calls  # 6 MiB at once is past 4 MiB; one image fits
    assert rows["path"] == list(files) and rows["error"] == [None] * 8 and None not in rows["label"]
    calls.clear()  # runs of 6 (--max-input-bytes): once one is past the cap, the rest go an image at a time
    rows = score(predictor, list(files), list(files.values()), top_k=1, max_pixels=40_000_000,
                 max_input_bytes=6 * 3 * 256 * 256 * 4)
    assert calls == [6, 1, 1, 1, 1, 1, 1, 1, 1], calls
    assert rows["path"] == list(files) and rows["error"] == [None] * 8
    # An image that does not fit alone (as if a file's input were 64 images'): its row is refused, the run goes on.
    predictor.run = lambda batch: calls.append(len(batch)) or run_model(np.repeat(batch, 64, axis=0))
    calls.clear()
    rows = score(predictor, list(files)[:2], list(files.values())[:2], top_k=1, max_pixels=40_000_000)
    assert calls == [2, 1, 1] and rows["error"] == ["model_memory_exhausted"] * 2, rows
    assert "4 MiB it may hold (--ort-memory-bytes)" in rows["reason"][0]
    with pytest.raises(ModelRefused, match=r"1 MiB ONNX Runtime may hold \(--ort-memory-bytes\)"):
        load_proven(data, path, hashlib.sha256(data).hexdigest(), 1, memory_cap=2**20)
    assert command.get_args_parser().parse_args(["--model", "m", "--input", "i", "--output", "o",
                                                 "--ort-memory-bytes", "0"]).ort_memory_bytes == 0
    assert BatchConfig("m", "i", "o").ort_memory_bytes == 2 * 2**30
