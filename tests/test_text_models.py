"""The text models: any batch, a padding mask that makes padding invisible, an empty text answered."""

from __future__ import annotations

import pytest
import torch

from torchferry.distributed import TorchferryError
from torchferry.distributed.text_models import TEXT_ARCHS, build_text_model, check_text_arch_kwargs


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_padding_does_not_change_the_answer_and_an_empty_text_is_answered(arch: str) -> None:
    torch.manual_seed(0)
    model = build_text_model(arch, 3, vocab_size=30, max_length=16).eval()
    ids = torch.zeros(3, 16, dtype=torch.int64)
    ids[0, :5] = torch.tensor([5, 9, 2, 7, 7])
    ids[1, :16] = torch.arange(2, 18)
    with torch.no_grad():
        full = model(ids)
        short = model(ids[:, :8])  # the same texts with less padding (the first is within 8 tokens)
        alone = model(ids[:1])
    assert full.shape == (3, 3) and torch.isfinite(full).all()  # row 2 is all padding: an empty text
    torch.testing.assert_close(full[0], short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[:1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[0], full[2])


def test_arch_kwargs_from_a_file_are_bounded_and_unknown_names_refused() -> None:
    assert check_text_arch_kwargs({"hidden_size": 32}) == {"hidden_size": 32}
    for bad in ({"hidden_size": 10**9}, {"evil": 1}, {"num_layers": True}, [1]):
        with pytest.raises(TorchferryError):
            check_text_arch_kwargs(bad)
    with pytest.raises(TorchferryError, match="unknown text model"):
        build_text_model("gru", 2, 10, 4)
    with pytest.raises(TorchferryError, match="multiple of num_heads"):
        build_text_model("transformer", 2, 10, 4, {"embed_dim": 10, "num_heads": 4})


def test_an_image_model_or_a_factory_of_the_wrong_shape_is_refused_before_training(tmp_path) -> None:
    from helpers import write_text_csv

    from torchferry.distributed.config import TrainConfig
    from torchferry.distributed.tasks import get_task

    data = str(write_text_csv(tmp_path / "texts.csv", per_class=4))
    with pytest.raises(TorchferryError, match="not a text model"):
        get_task("text").prepare(TrainConfig(task="text", data=data, model="smallcnn"))
    with pytest.raises(TorchferryError, match=r"gives \[2, 5\] for 2 texts"):
        get_task("text").prepare(TrainConfig(task="text", data=data, model="custom_model:text_five_outputs"))


def test_a_checkpoint_with_a_hostile_text_spec_is_refused_on_load(tmp_path) -> None:
    from helpers import write_text_checkpoint, write_text_csv

    from torchferry.contract import ContractError
    from torchferry.distributed.checkpoint import load_checkpoint, save_checkpoint

    path = write_text_checkpoint(tmp_path / "best.pth", write_text_csv(tmp_path / "texts.csv", per_class=4), epochs=1)
    checkpoint = load_checkpoint(str(path))
    checkpoint["text"] = {**checkpoint["text"], "vocab": ["<pad>", "<unk>", "a", "a"]}
    save_checkpoint(checkpoint, str(tmp_path / "bad.pth"))
    with pytest.raises(ContractError, match="text.vocab holds a token twice"):
        load_checkpoint(str(tmp_path / "bad.pth"))


@pytest.mark.slow
def test_the_transformer_exports_with_parity_on_real_validation_texts(tmp_path) -> None:
    from helpers import write_text_checkpoint, write_text_csv

    from torchferry.export.onnx import export_checkpoint

    data = write_text_csv(tmp_path / "texts.csv", per_class=10)
    path = write_text_checkpoint(tmp_path / "best.pth", data, arch="transformer", epochs=1)
    report = export_checkpoint(str(path), str(tmp_path / "model.onnx"), data=str(data))
    real = [c for c in report["cases"] if c["kind"] == "real"]
    assert report["passed"] and real and real[0]["top1_agreement"] == 1.0, report
