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
