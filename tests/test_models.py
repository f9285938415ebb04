"""The model zoo: heads replaced whatever they are called, pretrained weights from enums and files, freezing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision

from torchferry.distributed import TorchferryError
from torchferry.distributed.models import (
    build_model,
    find_head,
    resolve_weights,
    set_backbone_trainable,
    weights_preprocess,
)

ZOO = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_0", "densenet121", "convnext_tiny",
       "vgg11", "vit_b_16", "regnet_x_400mf", "shufflenet_v2_x0_5"]


@pytest.mark.parametrize("arch", ZOO)
def test_zoo_model_has_a_head_for_our_classes(arch: str) -> None:
    model = build_model(arch, 7).eval()
    size = 224 if arch.startswith("vit") else 64
    with torch.inference_mode():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)
    head = find_head(model, 7)
    assert head and all(n in dict(model.named_modules()) for n in head)


def test_smallcnn_takes_one_channel() -> None:
    model = build_model("smallcnn", 10, channels=1).eval()
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    assert find_head(model, 10) == ["classifier.1"]


def test_smallcnn_head_is_not_mistaken_for_a_layer_of_equal_width() -> None:
    assert find_head(build_model("smallcnn", 32, channels=1), 32) == ["classifier.1"]


def test_inception_aux_head_is_replaced_too() -> None:
    assert find_head(build_model("inception_v3", 5, arch_kwargs={"init_weights": False}), 5) == ["AuxLogits.fc", "fc"]


def test_local_pretrained_state_dict_keeps_backbone_and_replaces_head(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.pth")  # DDP-saved
    model = build_model("resnet18", 4, pretrained=str(tmp_path / "w.pth"))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 4


def test_torchvision_enum_weights_load_from_the_hub_cache(tmp_path: Path) -> None:
    """DEFAULT resolves to the real enum; its file is read from torch.hub's cache (no network here)."""
    weights = resolve_weights("resnet18", "DEFAULT")
    assert weights is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), cached)
    model = build_model("resnet18", 3, pretrained="DEFAULT")
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight) and model.fc.out_features == 3
    assert weights_preprocess("resnet18", "IMAGENET1K_V1") == {
        "size": 224, "resize": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_enum_weights_missing_offline_say_where_to_put_them() -> None:
    with pytest.raises(TorchferryError, match="place the file at .*mobilenet_v3_small"):
        build_model("mobilenet_v3_small", 3, pretrained="DEFAULT")


def test_custom_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    model = build_model("custom_model:build", 6)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 6)
    with pytest.raises(TorchferryError, match="not a torch.nn.Module"):
        build_model("custom_model:not_a_module", 6)
    with pytest.raises(TorchferryError, match="cannot import"):
        build_model("no_such_module_xyz:build", 6)


@pytest.mark.parametrize("arch,pretrained,match", [
    ("resnet9000", None, "unknown --model 'resnet9000'; choose smallcnn"),
    ("resnet18", "IMAGENET9K", "not a weights name of resnet18; choose DEFAULT or one of IMAGENET1K_V1"),
    ("smallcnn", "DEFAULT", "smallcnn has no torchvision weights"),
    ("resnet18", "/no/such/file.pth", "does not exist"),
])
def test_bad_model_choices(arch: str, pretrained: str | None, match: str) -> None:
    with pytest.raises(TorchferryError, match=match):
        build_model(arch, 3, pretrained=pretrained)


def test_zoo_model_refuses_one_channel() -> None:
    with pytest.raises(TorchferryError, match="3-channel input"):
        build_model("resnet18", 3, channels=1)


def test_freeze_backbone_leaves_only_the_head_trainable() -> None:
    model = build_model("mobilenet_v3_small", 5)
    head = find_head(model, 5)
    set_backbone_trainable(model, head, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.3.weight", "classifier.3.bias"}
    set_backbone_trainable(model, head, True)
    assert all(p.requires_grad for p in model.parameters())
