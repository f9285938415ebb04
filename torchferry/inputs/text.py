"""The text task's tokenizer and vocabulary, torch-free: the one `encode` that training and the server both run.

A text becomes token ids in three documented steps, written here once so that training and serving cannot
drift apart (docs/design.md, "The text task"):

1. Unicode NFKC normalisation, then `str.lower()`.
2. Tokens are the matches of TOKEN_PATTERN, in order: a run of letters and digits (any script; `_` is not a
   letter) with inner apostrophes kept (``don't``), or one character that is neither a letter, a digit nor
   white space (punctuation and symbols, each its own token). White space separates and is dropped.
3. Each token maps to its id in the vocabulary, `<unk>` (id 1) when it is not there; the ids are cut to
   `max_length` and padded at the end with `<pad>` (id 0) to exactly `max_length`.

The vocabulary is built from the training split alone (`build_vocab`): tokens seen at least `min_freq`
times, most frequent first (ties in code-point order, so the same texts always give the same vocabulary),
cut to `max_size` entries counting `<pad>` and `<unk>`; the count holds a bounded number of distinct tokens. It travels as plain data, the `text` spec
(`text_spec`): a list of strings in id order and a few numbers, which a weights-only checkpoint and an ONNX
file's metadata both hold. A file is untrusted: `text_spec_problems` checks every field and its size before
anything is built from it, and the file names the tokenizer (TOKENIZER), never a pattern to compile.

Standard library and numpy only (numpy inside the functions that use it), so `torchferry.serve` imports it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from torchferry.contract import ContractError, is_int, short

if TYPE_CHECKING:
    import numpy as np

TOKENIZER = "torchferry.words/1"
TOKEN_PATTERN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s]|_")
PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
# Bounds of a text spec read from a file: what a reader holds in memory for it (ids, a dict of tokens).
MAX_VOCAB = 200_000
MAX_TOKEN_CHARS = 100
MAX_SEQUENCE = 4096


def normalise(text: str) -> str:
    """Step 1: NFKC, then lower case."""
    return unicodedata.normalize("NFKC", text).lower()


def tokenize(text: str, limit: int | None = None) -> list[str]:
    """The tokens of `text` (steps 1 and 2), at most `limit` of them (the rest of the text is not scanned)."""
    tokens: list[str] = []
    for match in TOKEN_PATTERN.finditer(normalise(text)):
        if limit is not None and len(tokens) >= limit:
            break
        tokens.append(match.group())
    return tokens


# How many distinct tokens `build_vocab` counts at once: COUNTED_PER_ENTRY per vocabulary entry asked for, and
# COUNTED_AT_LEAST whatever the size: about 150 bytes each for words, up to about 600 for tokens of MAX_TOKEN_CHARS
# characters outside Latin-1 (so 15-60 MB at least, 120 MB at the default size, 1.2 GB at MAX_VOCAB). A
# corpus with fewer distinct tokens gets exactly the vocabulary a full count gives; past the bound the rarest
# are dropped from the count, as word2vec's ReduceVocab and gensim's max_vocab_size do.
COUNTED_PER_ENTRY = 10
COUNTED_AT_LEAST = 100_000


def build_vocab(texts: Iterable[str], *, min_freq: int = 1, max_size: int = 20_000,
                max_counted: int | None = None) -> list[str]:
    """The vocabulary of `texts` in id order: `<pad>`, `<unk>`, then tokens seen `min_freq` times or more, most
    frequent first, ties in code-point order, `max_size` entries in all (tokens longer than MAX_TOKEN_CHARS are
    left to `<unk>`).

    At most `max_counted` distinct tokens are counted at once (default: COUNTED_PER_ENTRY × max_size, at least
    COUNTED_AT_LEAST), so memory does not grow with a corpus's distinct tokens: when the count passes it, the
    tokens of the lower half of the counts are dropped (lossy counting; a token dropped and seen again counts
    from there). Below the bound the vocabulary is exactly that of a full count."""
    if min_freq < 1 or not 3 <= max_size <= MAX_VOCAB:
        raise ValueError(f"min_freq must be >= 1 and max_size from 3 to {MAX_VOCAB}, got {min_freq}, {max_size}")
    bound = max_counted or max(COUNTED_PER_ENTRY * max_size, COUNTED_AT_LEAST)
    counts: dict[str, int] = {}
    for text in texts:
        for match in TOKEN_PATTERN.finditer(normalise(text)):
            tok = match.group()
            if len(tok) <= MAX_TOKEN_CHARS:
                counts[tok] = counts.get(tok, 0) + 1
                if len(counts) > bound:
                    _drop_rarest_half(counts)
    kept = sorted((tok for tok, n in counts.items() if n >= min_freq), key=lambda tok: (-counts[tok], tok))
    return [PAD, UNK, *kept[:max_size - 2]]


def _drop_rarest_half(counts: dict[str, int]) -> None:
    """Drop the tokens counted no more often than the median count (at least half of them), in place."""
    median = sorted(counts.values())[len(counts) // 2]
    for tok in [tok for tok, n in counts.items() if n <= median]:
        del counts[tok]


def text_spec(vocab: list[str], max_length: int) -> dict[str, Any]:
    """The `text` spec a checkpoint and a model file carry: what `Encoder` needs, as plain data."""
    return {"tokenizer": TOKENIZER, "lowercase": True, "normalization": "NFKC", "vocab": list(vocab),
            "max_length": int(max_length), "pad_id": PAD_ID, "unk_id": UNK_ID}


def text_spec_problems(spec: Any) -> Iterator[str]:
    """What is wrong with a `text` spec read from a file, first problem first (nothing when it is sound)."""
    if not isinstance(spec, dict):
        yield f"text must be a mapping, got {type(spec).__name__}"
        return
    fixed = {"tokenizer": TOKENIZER, "lowercase": True, "normalization": "NFKC", "pad_id": PAD_ID, "unk_id": UNK_ID}
    for key, want in fixed.items():
        if spec.get(key) != want or isinstance(spec.get(key), bool) != isinstance(want, bool):
            yield f"text.{key} must be {want!r}, got {short(spec.get(key))}"
    if not is_int(spec.get("max_length"), 1, MAX_SEQUENCE):
        yield f"text.max_length must be an integer from 1 to {MAX_SEQUENCE}, got {short(spec.get('max_length'))}"
    vocab = spec.get("vocab")
    if not isinstance(vocab, list) or not 3 <= len(vocab) <= MAX_VOCAB:
        yield f"text.vocab must be a list of 3 to {MAX_VOCAB} tokens, got {short(vocab)}"
    elif vocab[:2] != [PAD, UNK]:
        yield f"text.vocab must start with {PAD!r}, {UNK!r}, got {short(vocab[:2])}"
    elif not all(isinstance(t, str) and 0 < len(t) <= MAX_TOKEN_CHARS for t in vocab):
        yield f"text.vocab must hold tokens of 1 to {MAX_TOKEN_CHARS} characters"
    elif len(set(vocab)) != len(vocab):
        yield "text.vocab holds a token twice"


def check_text_spec(spec: Any, where: str = "the file") -> dict[str, Any]:
    """`spec` when it is sound; else ContractError naming its first problem."""
    for problem in text_spec_problems(spec):
        raise ContractError(f"{where}: {problem}")
    return spec


class Encoder:
    """Texts → int64 token ids [N, max_length] (step 3) for one checked `text` spec."""

    def __init__(self, spec: dict[str, Any]):
        check_text_spec(spec, "text spec")
        self.max_length = int(spec["max_length"])
        self.vocab_size = len(spec["vocab"])
        self._ids = {tok: i for i, tok in enumerate(spec["vocab"])}

    def ids(self, text: str) -> list[int]:
        """The ids of one text, at most max_length, unpadded."""
        return [self._ids.get(tok, UNK_ID) for tok in tokenize(text, self.max_length)]

    def encode(self, texts: Iterable[str]) -> np.ndarray:
        """The model's input for `texts`: int64 [N, max_length], `<pad>` after each text's ids."""
        import numpy as np

        rows = [self.ids(text) for text in texts]
        out = np.full((len(rows), self.max_length), PAD_ID, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out
