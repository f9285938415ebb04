"""The text task's tokenizer, vocabulary, encoding and spec checks (torchferry.inputs.text)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from torchferry.contract import ContractError
from torchferry.inputs import text
from torchferry.inputs.text import PAD_ID, UNK_ID, Encoder, build_vocab, text_spec, tokenize


def test_tokenize_lowercases_and_splits_words_and_punctuation() -> None:
    assert tokenize("Hello, World! Don't STOP") == ["hello", ",", "world", "!", "don't", "stop"]
    assert tokenize("ｆｕｌｌ width café_au_lait 42x") == ["full", "width", "café", "_", "au", "_", "lait", "42x"]
    assert tokenize("  \n\t ") == []
    assert tokenize("a b c d e", limit=2) == ["a", "b"]


def test_vocab_comes_from_counts_then_code_point_order_and_honours_the_limits() -> None:
    texts = ["b a a", "c b a", "d"]
    assert build_vocab(texts) == ["<pad>", "<unk>", "a", "b", "c", "d"]
    assert build_vocab(texts, min_freq=2) == ["<pad>", "<unk>", "a", "b"]
    assert build_vocab(texts, max_size=3) == ["<pad>", "<unk>", "a"]
    assert build_vocab(list(reversed(texts))) == build_vocab(texts)
    assert build_vocab(["x" * (text.MAX_TOKEN_CHARS + 1) + " y"]) == ["<pad>", "<unk>", "y"]
    with pytest.raises(ValueError):
        build_vocab(texts, min_freq=0)


def _full_count_vocab(texts: list[str], min_freq: int, max_size: int) -> list[str]:
    """The vocabulary as a full count of every distinct token gives it (what build_vocab gave before its bound)."""
    from collections import Counter

    counts = Counter(tok for t in texts for tok in tokenize(t) if len(tok) <= text.MAX_TOKEN_CHARS)
    kept = sorted((tok for tok, n in counts.items() if n >= min_freq), key=lambda tok: (-counts[tok], tok))
    return ["<pad>", "<unk>", *kept[:max_size - 2]]


def test_vocab_of_a_corpus_under_the_counting_bound_is_that_of_a_full_count() -> None:
    """A Zipf-distributed corpus of a few thousand distinct words: the same vocabulary, whatever the limits, as long
    as its distinct tokens fit the bound; one past it, the frequent words are still found."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(6000)]
    texts = [" ".join(words[min(int(r) - 1, 5999)] for r in rng.zipf(1.3, size=40)) + " ." for _ in range(2000)]
    distinct = len({tok for t in texts for tok in tokenize(t)})
    assert 1000 < distinct < text.COUNTED_AT_LEAST
    for min_freq, max_size in ((1, 20_000), (1, 50), (2, 300), (5, 3)):
        assert build_vocab(texts, min_freq=min_freq, max_size=max_size) == _full_count_vocab(texts, min_freq, max_size)
    assert build_vocab(texts, max_size=50, max_counted=distinct) == _full_count_vocab(texts, 1, 50)
    assert build_vocab(texts, max_size=20, max_counted=distinct // 4)[:12] == _full_count_vocab(texts, 1, 12)


def test_vocab_counting_memory_does_not_grow_with_distinct_tokens() -> None:
    """400,000 distinct tokens (a hostile CSV's): the count is bounded (64 MiB traced for a full count), and the
    words every line repeats still lead the vocabulary."""
    import tracemalloc

    texts = [" ".join(f"w{i * 100 + j:x}" for j in range(100)) + " the the of" for i in range(4000)]
    tracemalloc.start()
    try:
        vocab = build_vocab(texts, max_size=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"{peak / 2**20:.1f} MiB"
    assert vocab[:4] == ["<pad>", "<unk>", "the", "of"] and len(vocab) <= 100


def test_encode_maps_unknown_tokens_truncates_and_pads_at_the_end() -> None:
    enc = Encoder(text_spec(build_vocab(["good movie", "bad movie"]), max_length=4))
    ids = enc.encode(["Good movie!", "", "bad bad bad bad bad bad"])
    assert ids.dtype == np.int64 and ids.shape == (3, 4)
    vocab = ["<pad>", "<unk>", "movie", "bad", "good"]
    assert ids[0].tolist() == [vocab.index("good"), vocab.index("movie"), UNK_ID, PAD_ID]
    assert ids[1].tolist() == [PAD_ID] * 4
    assert ids[2].tolist() == [vocab.index("bad")] * 4


@pytest.mark.parametrize(("change", "problem"), [
    ({"tokenizer": "regex:(a+)+$"}, "text.tokenizer"),
    ({"lowercase": 1}, "text.lowercase"),
    ({"pad_id": False}, "text.pad_id"),
    ({"max_length": 10**9}, "text.max_length"),
    ({"max_length": True}, "text.max_length"),
    ({"vocab": ["<pad>", "<unk>"]}, "text.vocab must be a list of 3"),
    ({"vocab": ["<unk>", "<pad>", "a"]}, "must start with"),
    ({"vocab": ["<pad>", "<unk>", ""]}, "tokens of 1 to"),
    ({"vocab": ["<pad>", "<unk>", 7]}, "tokens of 1 to"),
    ({"vocab": ["<pad>", "<unk>", "a", "a"]}, "twice"),
    ({"vocab": ["<pad>", "<unk>"] + ["t"] * text.MAX_VOCAB}, "text.vocab must be a list of 3"),
])
def test_a_file_s_text_spec_is_checked_field_by_field(change: dict, problem: str) -> None:
    spec = {**text_spec(["<pad>", "<unk>", "a"], 8), **change}
    with pytest.raises(ContractError, match=problem.replace("(", r"\(").replace("+", r"\+")):
        text.check_text_spec(spec)
    assert text.check_text_spec(text_spec(["<pad>", "<unk>", "a"], 8))
    assert list(text.text_spec_problems([1])) == ["text must be a mapping, got list"]


def test_the_text_inputs_load_without_torch() -> None:
    code = ("import sys, torchferry.inputs.text; "
            "bad = [m for m in ('torch', 'numpy', 'torchferry.distributed') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
