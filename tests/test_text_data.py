"""Reading a `text,label` CSV: quoting, UTF-8, blank lines, the split, and one clear line for each bad file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchferry.distributed import TorchferryError
from torchferry.distributed.text_data import encoded_dataset, read_text_csv, text_split
from torchferry.inputs.text import build_vocab, text_spec


def _write(tmp_path: Path, content: str | bytes, name: str = "texts.csv") -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def test_quoted_commas_line_breaks_utf8_and_blank_lines_are_read(tmp_path: Path) -> None:
    path = _write(tmp_path, '\ufefftext,label\n"great, truly ""great"" film",pos\n\n"line one\nline two",neg\n'
                            "crème brûlée,pos\r\n")
    assert read_text_csv(path) == [('great, truly "great" film', "pos", 2), ("line one\nline two", "neg", 5),
                                   ("crème brûlée", "pos", 6)]


def test_columns_are_found_by_name_whatever_their_order(tmp_path: Path) -> None:
    path = _write(tmp_path, "id,Label,Text\n1,b,hello\n")
    assert read_text_csv(path) == [("hello", "b", 2)]


@pytest.mark.parametrize(("content", "message"), [
    (b"path,label\na.png,x\n", "needs 'text' and 'label' columns"),
    (b"text,label\nhello,pos,extra\n", "texts.csv:2: 3 fields where the header has 2"),
    (b"text,label\nok,pos\nhello\n", "texts.csv:3: 1 fields where the header has 2"),
    (b"text,label\n  ,pos\n", "texts.csv:2: empty text"),
    (b"text,label\nhello,\n", "texts.csv:2: empty label"),
    (b"text,label\nok,pos\n\xff\xfe bad,neg\n", "not UTF-8"),
    (b"text,label\nok,pos\nnul\x00here,neg\n", "texts.csv:3: a NUL character"),
    (b"text,label\n\n", "no rows under the header"),
    (b"", "needs 'text' and 'label' columns"),
    (b'text,label\n"unclosed,pos\n', "not a readable CSV"),
])
def test_a_bad_file_is_refused_in_one_line_naming_it(tmp_path: Path, content: bytes, message: str) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(TorchferryError, match=message) as info:
        read_text_csv(path)
    assert "\n" not in str(info.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TorchferryError, match="does not exist"):
        read_text_csv(str(tmp_path / "nope.csv"))


def _labelled(n: int) -> str:
    return "text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(n))


def test_the_split_is_stratified_disjoint_and_the_same_for_a_seed(tmp_path: Path) -> None:
    path = _write(tmp_path, _labelled(40))
    split = text_split(path, val_split=0.25, seed=3)
    assert split.classes == ["a", "b"] and len(split.val) == 10 and len(split.train) == 30
    assert sorted(label for _, label in split.val) == [0] * 5 + [1] * 5
    assert not {t for t, _ in split.train} & {t for t, _ in split.val}
    assert text_split(path, val_split=0.25, seed=3) == split
    assert text_split(path, val_split=0.25, seed=4).val != split.val


def test_a_validation_file_is_used_as_it_is_and_its_labels_must_be_known(tmp_path: Path) -> None:
    path = _write(tmp_path, _labelled(6))
    val = _write(tmp_path, "text,label\nx,a\n", "val.csv")
    split = text_split(path, val_path=val)
    assert len(split.train) == 6 and split.val == [("x", 0)]
    bad = _write(tmp_path, "text,label\nx,c\n", "bad.csv")
    with pytest.raises(TorchferryError, match="bad.csv:2: label 'c' does not occur"):
        text_split(path, val_path=bad)


def test_one_label_or_a_single_row_label_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TorchferryError, match="a classifier needs at least 2"):
        text_split(_write(tmp_path, "text,label\na,x\nb,x\n"))
    with pytest.raises(TorchferryError, match=r"label\(s\) 'y' .* single text"):
        text_split(_write(tmp_path, "text,label\na,x\nb,x\nc,y\n"))


def test_the_encoded_dataset_holds_ids_and_labels(tmp_path: Path) -> None:
    rows = [("good film", 1), ("bad", 0)]
    spec = text_spec(build_vocab(t for t, _ in rows), 3)
    ds = encoded_dataset(rows, spec)
    ids, label = ds[0]
    assert ids.dtype == torch.int64 and ids.tolist()[2] == 0 and label.item() == 1


def test_a_csv_with_a_text_column_picks_the_text_task_and_its_defaults(tmp_path: Path) -> None:
    from torchferry.distributed.flags import config_from_args

    texts = _write(tmp_path, "\ufeffText,label\nhello,a\n")
    annotations = _write(tmp_path, "path,label\na.png,x\n", "images.csv")
    cfg = config_from_args(["--data", texts])
    assert (cfg.task, cfg.model, cfg.opt) == ("text", "lstm", "adam")
    assert config_from_args(["--data", annotations]).task == "image"
    assert config_from_args(["--data", annotations, "--task", "text"]).task == "text"


@pytest.mark.parametrize("flags", [["--max-length", "0"], ["--max-length", "5000"], ["--vocab-size", "2"],
                                   ["--min-freq", "0"]])
def test_text_flags_out_of_range_are_refused(flags: list[str]) -> None:
    from torchferry.distributed.config import validate_flags
    from torchferry.distributed.flags import config_from_args

    with pytest.raises(TorchferryError, match=flags[0]):
        validate_flags(config_from_args(["--task", "text", *flags]))


def test_labels_that_cannot_be_a_checkpoints_classes_are_refused_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from torchferry.contract import MAX_CLASS_NAME, MAX_CLASSES
    from torchferry.distributed import launch

    long_label = "x" * (MAX_CLASS_NAME + 1)
    with pytest.raises(TorchferryError, match="cannot be a checkpoint's classes"):
        text_split(_write(tmp_path, f"text,label\na,{long_label}\nb,{long_label}\nc,y\nd,y\n"))
    many = "".join(f"t,{i}\n" for i in range(MAX_CLASSES + 1))
    with pytest.raises(TorchferryError, match=f"from 2 to {MAX_CLASSES} classes, got {MAX_CLASSES + 1}"):
        text_split(_write(tmp_path, "text,label\n" + many, "many.csv"), allow_small_classes=True)
    code = launch.main(["--data", _write(tmp_path, f"text,label\na,{long_label}\nb,{long_label}\nc,y\nd,y\n", "l.csv"),
                        "--output-dir", str(tmp_path / "runs"), "--workers", "2", "--gpus", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be a checkpoint's classes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_the_tabular_and_text_csv_readers_share_one_field_limit(tmp_path: Path) -> None:
    from torchferry.distributed.discovery import MAX_CSV_FIELD
    from torchferry.distributed.tabular_data import read_csv

    long = "x" * 100_000  # over the 64 KiB the tabular reader once set for the whole process
    header, rows = read_csv(_write(tmp_path, f"a,b\n1,{long}\n", "table.csv"))
    assert header == ["a", "b"] and rows == [["1", long]]
    assert read_text_csv(_write(tmp_path, f"text,label\n{long},p\n"))[0][0] == long
    too_long = _write(tmp_path, f"a,b\n1,{'x' * (MAX_CSV_FIELD + 1)}\n", "big.csv")
    with pytest.raises(TorchferryError, match="field larger than field limit"):
        read_csv(too_long)
    with pytest.raises(TorchferryError, match="field larger than field limit"):
        read_text_csv(_write(tmp_path, f"text,label\n{'x' * (MAX_CSV_FIELD + 1)},p\n", "big_text.csv"))
