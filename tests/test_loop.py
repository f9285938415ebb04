"""The per-worker loop: metrics summed over every worker, schedules, precision choice, sharding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchferry.distributed.config import TrainConfig
from torchferry.distributed.epoch import amp_dtype
from torchferry.distributed.loop import ShardSampler, build_optimizer, build_scheduler


def _uneven_shards() -> dict:
    """Rank 0 holds 10 samples it gets right, rank 1 holds 30 it gets wrong."""
    import ray.train

    from torchferry.distributed.epoch import evaluate, train_one_epoch

    rank = ray.train.get_context().get_world_rank()
    n, target = (10, 0) if rank == 0 else (30, 1)
    x = torch.tensor([[5.0, 0.0]]).repeat(n, 1)  # logits that always say class 0
    loader = DataLoader(TensorDataset(x, torch.full((n,), target)), batch_size=4)
    val = evaluate(nn.Identity(), loader, nn.CrossEntropyLoss(), torch.device("cpu"))
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    train = train_one_epoch(model, loader, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0),
                            torch.device("cpu"))
    return {"val_acc": val.accuracy, "val_images": val.images, "train_acc": train.accuracy,
            "train_images": train.images, "rank": rank}


@pytest.mark.slow
def test_metrics_are_summed_over_all_workers_not_rank0(ray_2_cpus, tmp_path) -> None:
    import ray.train
    from ray.train.torch import TorchConfig

    from torchferry.distributed.launch import local_trainer_class

    result = local_trainer_class()(_uneven_shards, torch_config=TorchConfig(backend="gloo"),
                          scaling_config=ray.train.ScalingConfig(num_workers=2),
                          run_config=ray.train.RunConfig(storage_path=str(tmp_path), name="shards")).fit()
    # The trainer for a Ray started here (launch.local_trainer_class) asks no autoscaling coordinator for resources,
    # so Ray Data's detached coordinator actor (a process of its own) was never created.
    with pytest.raises(ValueError, match="Failed to look up actor"):
        ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    m = result.return_value  # rank 0's
    assert m["rank"] == 0
    # rank 0 alone would say 1.0 over 10 images
    assert (m["val_images"], m["val_acc"]) == (40, pytest.approx(0.25))
    assert (m["train_images"], m["train_acc"]) == (40, pytest.approx(0.25))


def test_shard_sampler_covers_every_index_once() -> None:
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))


def _lrs(cfg: TrainConfig, epochs: int) -> list[float]:
    opt = build_optimizer(nn.Linear(2, 2).parameters(), cfg, cfg.lr or 0.1)
    sched = build_scheduler(opt, cfg, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_with_warmup_rises_then_decays() -> None:
    lrs = _lrs(TrainConfig(lr=0.1, lr_scheduler="cosine", lr_warmup_epochs=2, lr_warmup_decay=0.1), 8)
    assert lrs[0] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.02


def test_step_and_multistep_decay_where_asked() -> None:
    assert _lrs(TrainConfig(lr=1.0, lr_scheduler="step", lr_step_size=2, lr_gamma=0.5), 5) == [1, 1, 0.5, 0.5, 0.25]
    assert _lrs(TrainConfig(lr=1.0, lr_scheduler="multistep", lr_milestones=[1, 3], lr_gamma=0.1), 4) == \
        pytest.approx([1, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("opt,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_optimizers(opt: str, cls: type) -> None:
    o = build_optimizer(nn.Linear(2, 2).parameters(), TrainConfig(opt=opt, weight_decay=0.01), 0.5)
    assert isinstance(o, cls) and o.param_groups[0]["lr"] == 0.5 and o.param_groups[0]["weight_decay"] == 0.01


def test_amp_dtype_is_bf16_on_cpu() -> None:
    assert amp_dtype(torch.device("cpu")) == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_dtype_on_gpu_matches_the_hardware() -> None:
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert amp_dtype(torch.device("cuda")) == want


def test_uint8_training_images_are_normalised_like_the_cpu_transform() -> None:
    """The GPU path: workers stop at uint8, the loop normalises on the device; same tensors as on the CPU."""
    import numpy as np
    from PIL import Image

    from torchferry.distributed.config import resolve_defaults
    from torchferry.distributed.epoch import train_one_epoch
    from torchferry.distributed.presets import DeviceNormalize, build_train_transform

    cfg = resolve_defaults(TrainConfig(data="folder-x", image_size=16, hflip=0.0, crop_scale_min=1.0, channels=3))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    as_uint8 = build_train_transform(cfg, normalize=False)(img)
    as_float = build_train_transform(cfg)(img)
    assert as_uint8.dtype == torch.uint8 and as_float.dtype == torch.float32
    normalize = DeviceNormalize(cfg.mean, cfg.std)
    torch.testing.assert_close(normalize(as_uint8[None]), as_float[None], atol=1e-6, rtol=0)

    loader = DataLoader(TensorDataset(as_uint8[None].repeat(4, 1, 1, 1), torch.zeros(4, dtype=torch.long)), batch_size=2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, loader, nn.CrossEntropyLoss(), sgd, torch.device("cpu"), normalize=normalize)
    assert stats.images == 4
    with pytest.raises(TypeError, match="without a normalisation step"):
        train_one_epoch(model, loader, nn.CrossEntropyLoss(), sgd, torch.device("cpu"))


def test_resume_takes_the_newest_epoch_that_loads_whatever_the_folder_names(tmp_path) -> None:
    """Folder names do not order epochs (Ray's record may lag them); a damaged newest one is passed over."""
    from helpers import write_checkpoint, write_class_tree

    from torchferry.distributed import checkpoint as ckpt
    from torchferry.distributed.resume import checkpoint_dirs, newest_usable

    write_class_tree(tmp_path / "data", 4)
    made = ckpt.load_checkpoint(str(write_checkpoint(tmp_path / "made.pth", "smallcnn", tmp_path / "data", size=16)))
    run = tmp_path / "run"
    for name, epoch in (("checkpoint_a", 2), ("checkpoint_b", 0), ("checkpoint_c", 3)):
        (run / name).mkdir(parents=True)
        ckpt.save_checkpoint({**made, "epoch": epoch}, str(run / name / ckpt.CHECKPOINT_FILE), sidecar=True)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    damaged = run / "checkpoint_c" / ckpt.CHECKPOINT_FILE
    damaged.write_bytes(damaged.read_bytes()[:-100])
    warnings: list[str] = []
    dirs = checkpoint_dirs(str(run))
    assert [d.rsplit("/", 1)[1] for d in dirs] == ["checkpoint_a", "checkpoint_b", "checkpoint_c"]
    directory, restored = newest_usable(dirs, warnings.append)
    assert directory.endswith("checkpoint_a") and restored["epoch"] == 2
    assert len(warnings) == 1 and "checkpoint_c is unusable" in warnings[0]
    assert checkpoint_dirs("s3://bucket/run") == [] and checkpoint_dirs(str(tmp_path / "none")) == []


def test_frozen_backbone_keeps_its_batchnorm_statistics() -> None:
    """--freeze-backbone: frozen BatchNorm layers run in eval mode, their running stats unchanged (issue 14)."""
    from torchferry.distributed.epoch import train_one_epoch
    from torchferry.distributed.models import build_model, find_head, set_backbone_trainable

    torch.manual_seed(0)
    model = build_model("smallcnn", 3, channels=3)
    head = find_head(model, 3)
    set_backbone_trainable(model, head, False)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16) * 3 + 1, torch.randint(0, 3, (8,))), batch_size=4)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    head_before = model.get_submodule(head[-1]).weight.clone()
    train_one_epoch(model, loader, nn.CrossEntropyLoss(), sgd, torch.device("cpu"))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.get_submodule(head[-1]).weight)  # the head still learns
    set_backbone_trainable(model, head, True)  # unfrozen: the statistics follow the data again
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, loader, nn.CrossEntropyLoss(), sgd, torch.device("cpu"))
    assert not torch.equal(before["features.1.running_mean"], model.state_dict()["features.1.running_mean"])
