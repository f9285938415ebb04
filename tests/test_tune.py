"""`python -m distributed.tune`: the search space and its refusals (fast), and one real search on Ray Tune (slow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from torchferry.distributed import TorchferryError
from torchferry.distributed import checkpoint as ckpt
from torchferry.distributed import tune as tune_cmd
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.space import build_space, check_against, trial_config


def run_tune(capsys: pytest.CaptureFixture, args: list[str]) -> tuple[int, str, str]:
    code = tune_cmd.main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------
# the space: flags and files


def test_flags_build_ray_tune_domains() -> None:
    from ray import tune

    space = build_space(None, {"lr": "1e-3:0.3", "batch_size": "32,64", "weight_decay": "uniform:0:1e-3",
                               "label_smoothing": "0:0.2", "model": "smallcnn,resnet18"})
    domains = space.to_param_space()
    assert isinstance(domains["lr"], tune.search.sample.Float)
    assert isinstance(domains["lr"].get_sampler(), tune.search.sample.LogUniform)
    assert (domains["lr"].lower, domains["lr"].upper) == (1e-3, 0.3)
    assert domains["batch_size"].categories == [32, 64]
    assert isinstance(domains["weight_decay"].get_sampler(), tune.search.sample.Uniform)
    assert isinstance(domains["label_smoothing"].get_sampler(), tune.search.sample.Uniform)
    assert domains["model"].categories == ["smallcnn", "resnet18"]
    assert space.models("smallcnn") == ["smallcnn", "resnet18"]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_space_file_and_flags_that_override_it(tmp_path: Path, suffix: str) -> None:
    spec = {"lr": {"loguniform": [1e-4, 1e-1]}, "batch_size": [16, 32], "label_smoothing": "0:0.1"}
    path = tmp_path / f"space{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(spec))
    else:
        import yaml

        path.write_text(yaml.safe_dump(spec))
    space = build_space(str(path), {"batch_size": "8,128", "lr": None})
    assert space.to_dict() == {"lr": {"loguniform": [1e-4, 1e-1]}, "batch_size": [8, 128],
                               "label_smoothing": {"uniform": [0.0, 0.1]}}
    assert build_space(None, space.to_dict() and {"lr": "log:1e-4:1e-1"}).get("lr").values == (1e-4, 1e-1)


@pytest.mark.parametrize("flags,message", [
    ({"lr": "0.3:1e-3"}, "LO 0.3 must be below HI 0.001"),
    ({"lr": "0:0.1"}, "log-uniform range needs LO > 0"),
    ({"lr": "-0.1,0.1"}, "learning rates must be positive"),
    ({"lr": "a:b"}, "expected a number"),
    ({"lr": "1:2:3:4"}, "give LO:HI"),
    ({"weight_decay": "uniform:-1:1"}, "must be 0 or more"),
    ({"label_smoothing": "0:1.5"}, "must be in \\[0, 1\\)"),
    ({"batch_size": "32:64"}, "expected a number"),
    ({"batch_size": "32,6.5"}, "whole numbers"),
    ({"batch_size": "0,32"}, "at least 1"),
    ({}, "nothing to search"),
])
def test_bad_flags_are_refused(flags: dict, message: str) -> None:
    with pytest.raises(TorchferryError, match=message):
        build_space(None, flags)


@pytest.mark.parametrize("text,message", [
    ("momentum: [0.8, 0.9]\n", "unknown search key 'momentum'"),
    ("lr: {loguniform: [0.1, 0.01]}\n", "must be below HI"),
    ("lr: {normal: [0.1, 0.01]}\n", "expected one of"),
    ("lr: {loguniform: [0.1]}\n", "takes \\[LO, HI\\]"),
    ("batch_size: {uniform: [8, 64]}\n", "takes a list of values"),
    ("model: []\n", "a choice needs 1 to 256 values"),
    ("lr: [0.1\n", "not valid YAML"),
    ("- lr\n- batch_size\n", "must map keys"),
])
def test_bad_space_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(TorchferryError, match=message):
        build_space(str(path), {})


def test_a_missing_or_malformed_json_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TorchferryError, match="cannot read it"):
        build_space(str(tmp_path / "absent.yaml"), {})
    (tmp_path / "space.json").write_text("{'lr': 1}")
    with pytest.raises(TorchferryError, match="not valid JSON"):
        build_space(str(tmp_path / "space.json"), {})


def test_batch_sizes_smaller_than_the_workers_are_refused() -> None:
    with pytest.raises(TorchferryError, match="at least the number of workers \\(4\\)"):
        check_against(build_space(None, {"batch_size": "2,64"}), TrainConfig(workers=4))


def test_unknown_image_models_are_refused() -> None:
    with pytest.raises(TorchferryError, match="unknown --model 'resnet9000'"):
        check_against(build_space(None, {"model": "smallcnn,resnet9000"}), TrainConfig())
    check_against(build_space(None, {"model": "smallcnn,resnet18"}), TrainConfig())


def test_label_smoothing_is_searched_only_for_the_image_classifier() -> None:
    with pytest.raises(TorchferryError, match="the tabular task has none to smooth"):
        check_against(build_space(None, {"label_smoothing": "0:0.2"}), TrainConfig(task="tabular"))
    check_against(build_space(None, {"label_smoothing": "0:0.2"}), TrainConfig(task="image"))


def test_a_trial_config_follows_the_launcher_defaults(tmp_path: Path) -> None:
    base = TrainConfig(name="s", lr=0.05, batch_size=128, opt="sgd", freeze_backbone=True, unfreeze_at_epoch=1,
                       finetune_lr=0.005, epochs=3)
    kwargs = {"name": "t1", "output_dir": str(tmp_path), "storage": None}
    # --lr left to its default: the linear scaling rule follows the sampled batch size, --finetune-lr follows lr
    cfg = trial_config(base, {"batch_size": 64}, lr_given=False, finetune_lr_given=False, **kwargs)
    assert (cfg.batch_size, cfg.lr, cfg.finetune_lr) == (64, pytest.approx(0.1 * 64 / 256), pytest.approx(0.1 * 64 / 2560))
    # --lr given: it stays; a sampled lr wins over both
    assert trial_config(base, {"batch_size": 64}, lr_given=True, finetune_lr_given=True, **kwargs).lr == 0.05
    sampled = trial_config(base, {"lr": 0.2, "label_smoothing": 0.1}, lr_given=True, finetune_lr_given=False, **kwargs)
    assert (sampled.lr, sampled.finetune_lr, sampled.label_smoothing) == (0.2, pytest.approx(0.02), 0.1)
    assert (sampled.name, sampled.output_dir, sampled.run_dir) == ("t1", str(tmp_path), str(tmp_path / "t1"))


# ------------------------------------------------------------------------------------------------
# the command: bad input is one line and exit 2, before Ray starts


@pytest.mark.parametrize("args,message", [
    (["--search-lr", "0.3:0.001"], "must be below HI"),
    (["--search-model", "smallcnn,nosuchnet"], "unknown --model 'nosuchnet'"),
    (["--search-lr", "1e-3:0.1", "--grace-period", "5", "--epochs", "2"], "--grace-period must be from 1"),
    (["--search-lr", "1e-3:0.1", "--reduction-factor", "1"], "--reduction-factor must be above 1"),
    (["--search-lr", "1e-3:0.1", "--num-samples", "0"], "--num-samples must be at least 1"),
    (["--search-lr", "1e-3:0.1", "--resume", "--name", "x"], "--resume continues one training run"),
    (["--search-lr", "1e-3:0.1", "--storage", "s3://bucket/x"], "not a URI"),
    (["--search-lr", "1e-3:0.1", "--epochs", "0"], "--epochs must be at least 1"),
    (["--space", "/nonexistent/space.yaml"], "cannot read it"),
    ([], "nothing to search"),
])
def test_bad_searches_fail_with_one_line(args: list[str], message: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a bad search"))
    code, _, err = run_tune(capsys, ["--output-dir", str(tmp_path / "runs"), *args])
    assert code == 2
    assert err.startswith("error: ") and message.replace("\\", "") in err.replace("\\", "")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_search_folder_that_holds_a_search_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    held = tmp_path / "runs" / "s"
    held.mkdir(parents=True)
    (held / "trials.csv").write_text("trial_id\n")
    code, _, err = run_tune(capsys, ["--output-dir", str(tmp_path / "runs"), "--name", "s", "--search-lr", "1e-3:1e-1",
                                     "--epochs", "1", "--workers", "1"])
    assert code == 2 and "already holds a search or a run" in err
    assert (held / "trials.csv").read_text() == "trial_id\n"


def test_help_names_the_search_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        tune_cmd.get_args_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--space", "--search-lr", "--search-batch-size", "--search-weight-decay", "--search-label-smoothing",
                 "--search-model", "--num-samples", "--grace-period", "--reduction-factor", "--workers", "--address"):
        assert flag in out


# ------------------------------------------------------------------------------------------------
# one real search: 4 trials of smallcnn on digits, 2 at a time on 2 CPUs, ASHA after the first epoch


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_search_keeps_the_best_trial_and_stops_poor_ones_early(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """4 trials, 2 epochs, 2 at a time, ASHA at epoch 1 keeping the better half (the digits at 16 px).

    With --seed 0 Tune samples lr 0.023 and 1.4e-4 for the first two trials (val_acc 0.22 and 0.17 after
    epoch 1), then 1.2e-4 and 0.24 (0.16 and 0.48). A third or fourth trial starts only when one of the first two
    has ended, so both are on the rung by then, and ASHA stops the third (and the second, when it reaches the rung
    after the first). Sampling (seeded) and training (seeded, one thread per CPU worker) repeat exactly for a
    seed."""
    runs = tmp_path / "runs"
    code, out, err = run_tune(capsys, [
        "--workers", "1", "--epochs", "2", "--num-workers", "0", "--image-size", "16", "--seed", "0",
        "--output-dir", str(runs),
        "--name", "search", "--num-samples", "4", "--grace-period", "1", "--reduction-factor", "2",
        "--search-lr", "1e-4:0.5", "--search-batch-size", "32,64"])
    assert code == 0, err
    search = runs / "search"
    rows = read_csv(search / "trials.csv")
    assert len(rows) == 4 and all(r["status"] in ("finished", "stopped early") for r in rows), rows
    for row in rows:  # the table agrees with each trial's own metrics.csv and config.json
        history = read_csv(search / "trials" / row["trial_id"] / "metrics.csv")
        assert int(row["epochs_run"]) == len(history)
        assert float(row["best_val_acc"]) == pytest.approx(max(float(h["val_acc"]) for h in history), abs=1e-6)
        config = json.loads((search / "trials" / row["trial_id"] / "config.json").read_text())
        assert (float(row["lr"]), int(row["batch_size"])) == (pytest.approx(config["lr"]), config["batch_size"])
    stopped = [r for r in rows if r["stopped_early"] == "true"]
    assert stopped and all(int(r["epochs_run"]) < 2 and r["status"] == "stopped early" for r in stopped)
    assert any(int(r["epochs_run"]) == 2 for r in rows)
    # best.pth is the best trial's best checkpoint, byte for byte, and the highest val_acc of every trial
    best_row = max(rows, key=lambda r: float(r["best_val_acc"]))
    best = ckpt.load_checkpoint(str(search / "best.pth"))
    assert best["metrics"]["val_acc"] == pytest.approx(float(best_row["best_val_acc"]), abs=1e-6)
    assert (search / "best.pth").read_bytes() == (search / "trials" / best_row["trial_id"] / "best.pth").read_bytes()
    assert best["config"]["name"] == best_row["trial_id"] and best["epoch"] + 1 == int(best_row["best_epoch"])
    assert best["config"]["lr"] == pytest.approx(float(best_row["lr"]))
    model = ckpt.model_from_checkpoint(best, factory=None)  # what export.onnx rebuilds
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 10)
    assert (search / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((search / "search.json").read_text())["space"]["batch_size"] == [32, 64]
    assert f"trial {best_row['trial_id']}" in out and str(search / "best.pth") in out
    assert f"trial {stopped[0]['trial_id']} stopped early by ASHA after 1 epoch(s)" in caplog.text
