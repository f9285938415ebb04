"""The text task's models: token ids [N, L] (0 = `<pad>`, after the text) → logits [N, classes].

`lstm` (the default): an embedding, an LSTM, the mean of its outputs over the text's own positions (the
padding mask comes from the ids, so it is part of the exported graph) and a linear head. `transformer`: a
small pre-norm Transformer encoder (learned positions, the key padding mask from the ids) pooled the same
way. Both take a fixed L (the spec's `max_length`) and any batch, and export to ONNX with a dynamic batch.
An empty text (all `<pad>`) is a valid input: it is read as its first position alone, so no division by
zero and no softmax over nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchferry.distributed import TorchferryError
from torchferry.inputs.text import PAD_ID

TEXT_ARCHS = ("lstm", "transformer")
# Keyword arguments a checkpoint may carry for each architecture, with their bounds (a file is untrusted).
ARCH_KWARG_BOUNDS = {"embed_dim": (2, 4096), "hidden_size": (2, 8192), "num_layers": (1, 24), "num_heads": (1, 64)}


def _masked_mean(states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of states [N, L, D] over each row's tokens (its first position when it has none)."""
    keep = ids.ne(PAD_ID)
    first = torch.arange(ids.shape[1], device=ids.device).eq(0).unsqueeze(0)
    keep = (keep | first).unsqueeze(-1).to(states.dtype)
    return (states * keep).sum(dim=1) / keep.sum(dim=1)


class TextLSTM(nn.Module):
    """Embedding → LSTM → masked mean over the text → dropout → linear."""

    def __init__(self, num_classes: int, vocab_size: int, max_length: int, embed_dim: int = 64,
                 hidden_size: int = 128, num_layers: int = 1, dropout: float = 0.2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embed(ids))
        return self.head(self.drop(_masked_mean(states, ids)))


class TextTransformer(nn.Module):
    """Token + learned position embeddings → pre-norm Transformer encoder (padding masked) → masked mean → linear."""

    def __init__(self, num_classes: int, vocab_size: int, max_length: int, embed_dim: int = 64,
                 hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4, dropout: float = 0.1):
        super().__init__()
        if embed_dim % num_heads:
            raise TorchferryError(f"transformer: embed_dim {embed_dim} must be a multiple of num_heads {num_heads}")
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.position = nn.Embedding(max_length, embed_dim)
        layer = nn.TransformerEncoderLayer(embed_dim, num_heads, hidden_size, dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        # The first position is never masked: an empty text attends to it rather than to nothing (NaN).
        masked = ids.eq(PAD_ID) & positions.ne(0).unsqueeze(0)
        x = self.embed(ids) + self.position(positions).unsqueeze(0)
        x = self.norm(self.encoder(x, src_key_padding_mask=masked))
        return self.head(_masked_mean(x, ids))


def check_text_arch_kwargs(kwargs: Any) -> dict[str, Any]:
    """A checkpoint's `arch_kwargs` for a text model: known keys, integers in bounds (refused otherwise)."""
    if not isinstance(kwargs, dict):
        raise TorchferryError(f"arch_kwargs must be a mapping, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        low, high = ARCH_KWARG_BOUNDS.get(key, (None, None))
        if low is None or isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise TorchferryError(f"arch_kwargs: {key!r}={value!r} is not one of {sorted(ARCH_KWARG_BOUNDS)} "
                                  "within its bounds")
    return dict(kwargs)


def build_text_model(arch: str, num_classes: int, vocab_size: int, max_length: int,
                     arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A text classifier by name (`lstm`, `transformer`) for the spec's vocabulary and length."""
    kwargs = check_text_arch_kwargs(arch_kwargs or {})
    if arch == "lstm":
        kwargs.pop("num_heads", None)
        return TextLSTM(num_classes, vocab_size, max_length, **kwargs)
    if arch == "transformer":
        return TextTransformer(num_classes, vocab_size, max_length, **kwargs)
    raise TorchferryError(f"unknown text model {arch!r}; choose one of {list(TEXT_ARCHS)} or PKG.MOD:FACTORY")
