"""`python -m distributed.launch` end to end on real Ray (local, 2 CPU workers) and its bad-input errors."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST_FLAGS

from distributed import checkpoint as ckpt
from distributed import launch
from distributed.config import TrainConfig
from distributed.data import ImageListDataset, discover
from distributed.presets import build_eval_transform

REPO = Path(__file__).resolve().parents[1]


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def accuracy_of(checkpoint: dict, samples: list[tuple[str, int]]) -> float:
    """Val accuracy recomputed in this process from the checkpoint alone."""
    model = ckpt.model_from_checkpoint(checkpoint, factory=None)
    ds = ImageListDataset(samples, checkpoint["preprocess"]["channels"], build_eval_transform(checkpoint["preprocess"]))
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    correct = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(ds)


def run_main(capsys: pytest.CaptureFixture, args: list[str]) -> tuple[int, str, str]:
    code = launch.main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------
# a real run and what it leaves behind


def test_imagefolder_run_learns_and_leaves_its_outputs(trained_run: dict) -> None:
    assert trained_run["code"] == 0
    run_dir: Path = trained_run["run_dir"]
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert list(rows[0]) == list(ckpt.METRIC_COLUMNS)
    assert all(r["images_per_s"] > 0 and r["seconds"] > 0 and r["lr"] > 0 for r in rows)
    assert max(r["val_acc"] for r in rows) >= 0.8  # 3 classes: chance is 0.33
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").iterdir())
    assert (run_dir / "config.json").is_file() and (run_dir / "best.pth.sha256").is_file()


def test_best_checkpoint_is_the_best_epoch_and_reproduces_its_accuracy(trained_run: dict) -> None:
    run_dir: Path = trained_run["run_dir"]
    best = ckpt.load_checkpoint(str(run_dir / "best.pth"))  # weights_only=True inside
    rows = read_metrics(run_dir)
    assert best["metrics"]["val_acc"] == pytest.approx(max(r["val_acc"] for r in rows), abs=1e-6)
    assert rows[best["epoch"]]["val_acc"] == pytest.approx(best["metrics"]["val_acc"], abs=1e-6)
    assert best["classes"] == ["blue", "green", "red"] and best["num_classes"] == 3
    assert best["preprocess"]["size"] == [16, 16] and best["preprocess"]["channels"] == 3
    assert not any(k.startswith("module.") for k in best["state_dict"])
    split = discover(TrainConfig.from_dict(best["config"]))
    assert accuracy_of(best, split.val) == pytest.approx(best["metrics"]["val_acc"], abs=1e-9)


def test_existing_run_is_never_overwritten(trained_run: dict, capsys: pytest.CaptureFixture) -> None:
    run_dir: Path = trained_run["run_dir"]
    before = (run_dir / "best.pth").read_bytes()
    code, _, err = run_main(capsys, [*FAST_FLAGS, "--data", str(trained_run["data"]),
                                     "--output-dir", str(run_dir.parent), "--name", run_dir.name])
    assert code == 2 and "already holds a run" in err
    assert (run_dir / "best.pth").read_bytes() == before


@pytest.mark.parametrize("layout", ["txt", "csv"])
def test_annotation_file_runs_learn(layout: str, annotation_files: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(capsys, [*FAST_FLAGS, "--data", str(annotation_files[f"train.{layout}"]),
                                       "--val-data", str(annotation_files[f"val.{layout}"]),
                                       "--output-dir", str(tmp_path / "runs"), "--name", layout])
    assert code == 0, err
    assert "best val_acc" in out and str(tmp_path / "runs" / layout / "best.pth") in out
    assert max(r["val_acc"] for r in read_metrics(tmp_path / "runs" / layout)) >= 0.8


def test_torchvision_cifar10_root_run_learns(cifar10_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(capsys, [*FAST_FLAGS, "--data", f"cifar10:{cifar10_root}",
                                     "--output-dir", str(tmp_path / "runs"), "--name", "cifar"])
    assert code == 0, err
    best = ckpt.load_checkpoint(str(tmp_path / "runs" / "cifar" / "best.pth"))
    assert best["num_classes"] == 10 and best["classes"][0] == "airplane"
    assert best["metrics"]["val_acc"] >= 0.8  # 3 populated classes of 10


def test_own_model_factory_runs_on_the_workers(flat_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    code, _, err = run_main(capsys, [*FAST_FLAGS, "--epochs", "1", "--data", str(flat_folder),
                                     "--model", "custom_model:build", "--output-dir", str(tmp_path / "runs"),
                                     "--name", "custom"])
    assert code == 0, err
    assert ckpt.load_checkpoint(str(tmp_path / "runs" / "custom" / "best.pth"))["arch"] == "custom_model:build"


# ------------------------------------------------------------------------------------------------
# bad input: a clear one-line error and a non-zero exit, before Ray starts


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    from conftest import write_class_tree

    write_class_tree(tmp_path / "one", 4, classes=("red",))
    write_class_tree(tmp_path / "ok" / "train", 4)
    write_class_tree(tmp_path / "ok" / "val", 2, classes=("red",))
    (tmp_path / "ok" / "val" / "red").rename(tmp_path / "ok" / "val" / "violet")
    (tmp_path / "bad.txt").write_text("a.png red\nno-label-here\n")
    write_class_tree(tmp_path / "broken", 4)
    (tmp_path / "broken" / "red" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {
        "missing path": (["--data", str(tmp_path / "nope")], "does not exist"),
        "one class": (["--data", str(tmp_path / "one")], "at least 2"),
        "val class not in train": (["--data", str(tmp_path / "ok")], "validation classes ['violet']"),
        "annotation line": (["--data", str(tmp_path / "bad.txt")], "bad.txt:2: expected 'relative/path label'"),
        "unreadable image": (["--data", str(tmp_path / "broken")], "1 unreadable image(s)"),
        "unknown model": (["--data", str(tmp_path / "broken"), "--model", "resnet9000"], "unknown --model"),
        "bad flag value": (["--epochs", "0"], "--epochs must be at least 1"),
        "batch below workers": (["--batch-size", "1"], "global batch"),
    }


@pytest.mark.parametrize("case", ["missing path", "one class", "val class not in train", "annotation line",
                                  "unreadable image", "unknown model", "bad flag value", "batch below workers"])
def test_bad_input_fails_with_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args, message = _bad_inputs(tmp_path)[case]
    code, out, err = run_main(capsys, ["--output-dir", str(tmp_path / "runs"), *args])
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_skip_bad_images_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture,
                                 caplog: pytest.LogCaptureFixture) -> None:
    from conftest import write_class_tree

    write_class_tree(tmp_path / "broken", 12)
    (tmp_path / "broken" / "red" / "zz.png").write_bytes(b"garbage")
    code, _, err = run_main(capsys, [*FAST_FLAGS, "--epochs", "1", "--data", str(tmp_path / "broken"),
                                     "--skip-bad-images", "--output-dir", str(tmp_path / "runs"), "--name", "s"])
    assert code == 0, err
    assert "leaving out 1 unreadable image(s)" in caplog.text


def test_gpus_on_a_cpu_machine_fail_fast(flat_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs")
    code, _, err = run_main(capsys, ["--gpus", "2", "--data", str(flat_folder), "--output-dir", str(tmp_path)])
    assert code == 2
    assert re.search(r"--gpus 2 asks for 2 GPU worker\(s\) but this machine has \d GPU", err)


def test_more_cpus_than_the_cluster_has_fail_fast(flat_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The check runs against the real Ray cluster's resources, not a guess."""
    code, _, err = run_main(capsys, ["--workers", "64", "--batch-size", "64", "--data", str(flat_folder),
                                     "--output-dir", str(tmp_path)])
    assert code == 2
    assert re.search(r"not enough resources: needs 64 CPU \(64 worker\(s\) × 1\) but the Ray cluster has \d+ CPU", err)


def test_help_explains_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "distributed.launch", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    for field in TrainConfig.__dataclass_fields__:
        flag = "--no-resource-check" if field == "resource_check" else "--" + field.replace("_", "-")
        assert flag in out, f"{flag} missing from --help"
    assert out.count("(default") >= 30


def test_readme_flag_table_lists_every_flag() -> None:
    readme = (REPO / "README.md").read_text()
    from distributed.config import get_args_parser

    for action in get_args_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}`" in readme, f"README flag table lacks {flag}"


def test_readme_command_on_digits_reaches_98_percent(tmp_path: Path) -> None:
    """The README's main command with its defaults, as a user runs it (about 90 s on 2 cores)."""
    env = {**os.environ, "TORCHFERRY_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "distributed.launch", "--gpus", "0", "--workers", "2",
                           "--output-dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"best val_acc (\d\.\d+) at epoch (\d+): (\S+best\.pth)", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) >= 0.98 and Path(match.group(3)).is_file()
    assert proc.stderr.count("epoch ") >= 30 and "Traceback" not in proc.stderr


def _is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    """Nothing the launcher's local Ray starts accepts connections from beyond this machine."""
    import psutil
    import ray

    cfg = TrainConfig(output_dir=str(tmp_path))
    assert launch.start_ray(cfg) is True
    try:
        ray.get(ray.remote(lambda: 1).remote())  # a worker process exists too
        ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
        listening = [c for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in ours]
        assert listening, "expected Ray's servers among this process tree's sockets"
        assert all(_is_loopback(c.laddr.ip) for c in listening), listening
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    finally:
        ray.shutdown()


def test_freeze_then_unfreeze_trains_head_first_then_everything(flat_folder: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(capsys, [*FAST_FLAGS, "--data", str(flat_folder), "--freeze-backbone",
                                     "--unfreeze-at-epoch", "2", "--finetune-lr", "0.01", "--keep-checkpoints", "4",
                                     "--output-dir", str(tmp_path / "runs"), "--name", "ft"])
    assert code == 0, err
    run_dir = tmp_path / "runs" / "ft"
    by_epoch = {}
    for path in run_dir.glob("checkpoint_*/checkpoint.pth"):
        c = ckpt.load_checkpoint(str(path))
        by_epoch[c["epoch"]] = c
    assert sorted(by_epoch) == [0, 1, 2, 3]
    conv = "features.0.weight"
    head = "classifier.1.weight"
    assert torch.equal(by_epoch[0]["state_dict"][conv], by_epoch[1]["state_dict"][conv])  # frozen
    assert not torch.equal(by_epoch[0]["state_dict"][head], by_epoch[1]["state_dict"][head])  # head learns
    assert not torch.equal(by_epoch[1]["state_dict"][conv], by_epoch[3]["state_dict"][conv])  # unfrozen
    assert [by_epoch[e]["backbone_frozen"] for e in range(4)] == [True, True, False, False]
    assert [r["lr"] for r in read_metrics(run_dir)][2] == pytest.approx(0.01)


def test_same_seed_repeats_the_run(trained_run: dict, capsys: pytest.CaptureFixture) -> None:
    run_dir: Path = trained_run["run_dir"]
    code, _, err = run_main(capsys, [*FAST_FLAGS, "--data", str(trained_run["data"]),
                                     "--output-dir", str(run_dir.parent), "--name", "again"])
    assert code == 0, err
    first, second = read_metrics(run_dir), read_metrics(run_dir.parent / "again")
    for a, b in zip(first, second, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


# ------------------------------------------------------------------------------------------------
# relative paths, run from another working directory (issue 14): Ray's workers run in its session folder


def _launch_in(cwd: Path, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "distributed.launch", *args], check=False, capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def _tb_scalar_tags(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.slow
def test_relative_paths_from_another_directory_reach_the_workers(tmp_path: Path) -> None:
    """--data, --output-dir, --storage, --cache-dir, --init-from and a --pretrained file, all relative."""
    from conftest import write_checkpoint, write_class_tree

    from distributed.models import build_model

    work = tmp_path / "work"
    write_class_tree(work / "data" / "shapes" / "train", 12, seed=1)
    write_class_tree(work / "data" / "shapes" / "val", 4, seed=2)
    write_checkpoint(work / "old" / "best.pth", "smallcnn", work / "data" / "shapes", size=16)
    torch.save(build_model("smallcnn", 3, channels=3).state_dict(), work / "weights.pth")
    proc = _launch_in(work, [*FAST_FLAGS, "--epochs", "1", "--data", "data/shapes", "--output-dir", "runs",
                             "--storage", "ckpts", "--cache-dir", "cache", "--init-from", "old/best.pth",
                             "--pretrained", "weights.pth", "--name", "rel"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = work / "runs" / "rel"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data"] == str(work / "data" / "shapes") and saved["cache_dir"] == str(work / "cache")
    assert saved["init_from"] == str(work / "old" / "best.pth") and saved["pretrained"] == str(work / "weights.pth")
    # rank 0's outputs land in the user's runs/<name>/, Ray's checkpoints under --storage
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0]
    assert {"val_acc", "train_loss"} <= _tb_scalar_tags(run_dir / "tb")
    assert json.loads((run_dir / "cluster.json").read_text())["workers"][0]["rank"] == 0
    assert list((work / "ckpts" / "rel").glob("checkpoint_*/checkpoint.pth"))
    assert (run_dir / "best.pth").is_file()


@pytest.mark.slow
def test_readme_csv_example_with_relative_image_root(annotation_files: dict[str, Path], tmp_path: Path) -> None:
    """README: `--data train.csv --val-data val.csv --image-root ...`, from the folder the files are in."""
    root = annotation_files["train.csv"].parent  # root/images/..., rows name images/train/<class>/<i>.png
    lists = root / "lists"
    lists.mkdir()
    for name in ("train.csv", "val.csv"):
        annotation_files[name].rename(lists / name)
    proc = _launch_in(lists, [*FAST_FLAGS, "--epochs", "1", "--data", "train.csv", "--val-data", "val.csv",
                              "--image-root", "..", "--name", "csv"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = lists
    assert (folder / "runs" / "csv" / "best.pth").is_file()
    assert [r["epoch"] for r in read_metrics(folder / "runs" / "csv")] == [0]


# ------------------------------------------------------------------------------------------------
# files do not choose code or paths: --resume's config.json, --init-from's checkpoint, --cache-dir

EVIL = '''import pathlib
pathlib.Path("marker").write_text("imported")


def factory(num_classes, **kwargs):
    pathlib.Path("marker").write_text("called")
'''


def test_cache_dir_naming_a_file_fails_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    code, _, err = run_main(capsys, ["--cache-dir", str(tmp_path / "file"), "--output-dir", str(tmp_path / "runs")])
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--cache-dir" in lines[0] and "is not a directory" in lines[0]
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "runs").exists()


def test_resume_runs_a_factory_only_when_named_again(flat_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's config.json is a file: its `model: evil:factory` is not imported; --model must name it again."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "evil.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    saved = TrainConfig(data=str(flat_folder), model="evil:factory", name="r", output_dir=str(runs))
    (runs / "r" / "config.json").write_text(json.dumps(saved.to_dict()))
    code, _, err = run_main(capsys, ["--resume", "--name", "r", "--output-dir", str(runs)])
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--model evil:factory" in lines[0], err
    assert not (tmp_path / "marker").exists()
    (runs / "r" / "config.json").write_text('{"model": 5}')
    code, _, err = run_main(capsys, ["--resume", "--name", "r", "--output-dir", str(runs)])
    assert code == 2 and "training config key 'model' must be str" in err and "Traceback" not in err


def test_init_from_a_factory_checkpoint_needs_that_model(flat_folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from conftest import write_checkpoint

    path = write_checkpoint(tmp_path / "src.pth", "smallcnn", flat_folder, size=16)
    source = ckpt.load_checkpoint(str(path))
    source["arch"] = "evil:factory"
    ckpt.save_checkpoint(source, str(path))
    (tmp_path / "src.pth.sha256").unlink()
    code, _, err = run_main(capsys, [*FAST_FLAGS, "--data", str(flat_folder), "--init-from", str(path),
                                     "--output-dir", str(tmp_path / "runs")])
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--model evil:factory" in lines[0], err
