"""What every command shares (torchferry/cli.py): a mistake on the command line is one line and exit 2."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from torchferry.batch.command import get_args_parser as batch_parser
from torchferry.distributed.evaluate import get_args_parser as evaluate_parser
from torchferry.distributed.flags import get_args_parser as launch_parser
from torchferry.distributed.tune import get_args_parser as tune_parser
from torchferry.export.onnx import get_args_parser as onnx_parser
from torchferry.export.verify import get_args_parser as verify_parser
from torchferry.serve.__main__ import get_args_parser as serve_parser

# Each command's parser, with the arguments it needs beside the mistake and one of its flags to misspell.
COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], list[str], str]] = {
    "python -m distributed.launch": (launch_parser, [], "--epochs"),
    "python -m distributed.tune": (tune_parser, [], "--num-samples"),
    "python -m distributed.evaluate": (evaluate_parser, ["best.pth"], "--output-dir"),
    "python -m export.onnx": (onnx_parser, ["best.pth"], "--quantize"),
    "python -m export.verify": (verify_parser, ["model.onnx", "best.pth"], "--min-top1-agreement"),
    "python -m serve": (serve_parser, [], "--port"),
    "python -m serve.batch": (batch_parser, ["--model", "m.onnx", "--input", "in", "--output", "out"], "--actors"),
}


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_a_misspelt_flag_is_one_line_naming_the_closest_flag(prog: str, capsys: pytest.CaptureFixture) -> None:
    make, needed, flag = COMMANDS[prog]
    typo = flag[:3] + flag[4] + flag[3] + flag[5:]  # two letters swapped: --epochs -> --peochs
    with pytest.raises(SystemExit) as stop:
        make().parse_args([*needed, typo, "2"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith(f"error: unrecognized arguments: {typo} 2 (did you mean {flag}?)"), err
    assert err.rstrip().endswith(f"{prog} --help lists the flags"), err


def test_a_bad_value_or_missing_argument_is_one_line_too(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        launch_parser().parse_args(["--epochs", "two"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "argument --epochs: invalid int value: 'two'" in err and "did you mean" not in err
    with pytest.raises(SystemExit) as stop:
        onnx_parser().parse_args([])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "required" in err


def test_help_still_prints_the_whole_usage(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        serve_parser().parse_args(["--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m serve")


def test_library_info_lines_stay_out_of_the_commands_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib's 'generated new fontManager' (a machine's first picture) is not printed by training, the search
    or evaluate, whose logging is at INFO."""
    import logging

    from torchferry.cli import run_main
    from torchferry.distributed.launch import setup_logging

    matplotlib = logging.getLogger("matplotlib")
    for configure in (lambda: setup_logging(verbose=True),
                      lambda: run_main(evaluate_parser(), lambda args: 0, ["best.pth"])):
        monkeypatch.setattr(matplotlib, "level", logging.NOTSET)  # as a fresh process has it; restored afterwards
        configure()
        assert matplotlib.level == logging.WARNING  # the command's root logger is at INFO (DEBUG with --verbose)
