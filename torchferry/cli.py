"""What every torchferry command does the same way: one-line errors with the exit codes of docs/design.md, and the
flags they share. Torch-free, so any command may import it.

Exit codes: 0 success, 1 the work failed (training failed, ONNX Runtime disagrees with PyTorch), 2 bad input
(a `TorchferryError`: a flag, a path, a file that breaks its contract); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from torchferry.contract import TorchferryError, error_line

BAD_INPUT, FAILED = 2, 1


class Parser(argparse.ArgumentParser):
    """argparse's parser whose mistakes (a misspelt flag, a bad value) end the command with one line and exit 2,
    naming the closest flag and `--help`, instead of the whole usage block (fifty lines for the launcher) above
    the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(BAD_INPUT, f"error: {message}{self._did_you_mean(message)}; {self.prog} --help lists the flags\n")

    def _did_you_mean(self, message: str) -> str:
        """' (did you mean --epochs?)' for an unrecognized flag close to one this parser has, else ''."""
        if not message.startswith("unrecognized arguments: "):
            return ""
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        for word in message.split(": ", 1)[1].split():
            close = difflib.get_close_matches(word.split("=")[0], flags, n=1) if word.startswith("--") else []
            if close:
                return f" (did you mean {close[0]}?)"
        return ""


def run_main(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int], argv: list[str] | None,
             *, failures: tuple[type[BaseException], ...] = ()) -> int:
    """A command's `main`: parse `argv`, log to stderr (DEBUG with --verbose), then `run_command(body(args))`."""
    args = parser.parse_args(argv)
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    quiet_libraries()
    return run_command(lambda: body(args), debug=args.debug, failures=failures)


# Libraries whose INFO lines are not the command's news: matplotlib's "generated new fontManager" when a machine
# draws its first picture (a run's curves, evaluate's confusion matrix), PIL's chunk-by-chunk debug lines.
LIBRARY_LOGGERS = ("matplotlib", "PIL")


def quiet_libraries() -> None:
    """The LIBRARY_LOGGERS at warnings, whatever the command's own level (--verbose included)."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_command(body: Callable[[], int], *, debug: bool,
                failures: tuple[type[BaseException], ...] = ()) -> int:
    """`body()`'s exit code; a TorchferryError (bad input) prints `error: ...` and gives 2, one of `failures` gives
    1. With `debug` both are raised instead, traceback and all."""
    try:
        return body()
    except TorchferryError as exc:
        if debug:
            raise
        return error(str(exc), BAD_INPUT)
    except failures as exc:
        if debug:
            raise
        return error(str(exc), FAILED)


def lead_line(exc: object) -> str:
    """The first non-empty line of an error (at most 300 characters), to quote inside a one-line message
    (`contract.error_line`: ONNX Runtime's status and C++ location left out)."""
    return error_line(exc)


def error(message: str, code: int) -> int:
    """Print `error: message` to stderr; returns `code`, for `return error(...)`."""
    print(f"error: {message}", file=sys.stderr)
    return code


def add_factory_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--model PKG.MOD:FACTORY for the commands that rebuild a checkpoint's model (`args.factory`)."""
    p.add_argument("--model", dest="factory", default=None, metavar="PKG.MOD:FACTORY", help="the checkpoint's "
                   "own model factory, named again: a checkpoint rebuilds smallcnn or a torchvision model by itself, "
                   "but imports and runs a package.module:factory only when you name it here (default: none)")


def add_debug_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, verbose: str | None = None) -> None:
    """--debug (tracebacks on errors) and, with its help text given, --verbose/-v."""
    if verbose is not None:
        p.add_argument("--verbose", "-v", action="store_true", help=verbose)
    p.add_argument("--debug", action="store_true", help="full tracebacks on errors")
