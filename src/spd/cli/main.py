"""The `spd` entry point: the parser assembled from one module per sub-command, and the one error
reporter every command (and `python -m spd.experiments.camera`) ends through."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from spd.allocator import SERVING_TRIM_THRESHOLD, TRIM_THRESHOLD, requested_setting, tune_cpu_allocator
from spd.cli import ablate, bench, data, demo, distill, evaluate, export, loadcheck, params, predict, serve, synth, train
from spd.errors import SPDError
from spd.versions import require_supported_versions

COMMANDS = (params, train, evaluate, predict, export, serve, loadcheck, demo, bench, ablate, synth, data, distill)  # `spd --help` order
# The commands that run a model for answers: glibc's malloc is tuned for them (spd.allocator), never
# for training or the data tools (DataLoader workers would inherit it and each keep its freed memory).
INFERENCE_COMMANDS = {"predict", "eval", "bench", "serve", "export"}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `spd <command>: error: <message> (see --help)`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spd",
        description="SPD: metric depth at the K pixels you ask for (encode the image once, decode only the queries).",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors (also SPD_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)  # each sets `func` to its own `run`
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one sub-command. The project's own errors (bad arguments, settings, data, checkpoints)
    end in one line `spd <command>: error: <message>` and their exit code (`spd.errors`); a bug keeps
    its traceback. `--debug` or SPD_DEBUG=1 shows the traceback of the project's errors too."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for manifests and hints
    debug = args.debug or os.environ.get("SPD_DEBUG") == "1"
    command = args.command + (f" {args.data_command}" if getattr(args, "data_command", None) else "")

    def run_command() -> int:
        require_supported_versions()  # a too-old torchvision: one line naming it, not an AttributeError mid-run
        requested_setting()  # a typo in SPD_MALLOC is refused by every command
        if args.command in INFERENCE_COMMANDS:
            # freed memory kept for the next call (SPD_MALLOC=default skips); a server keeps less
            tune_cpu_allocator(SERVING_TRIM_THRESHOLD if args.command == "serve" else TRIM_THRESHOLD)
        return args.func(args)

    return run_reporting_errors(f"spd {command}", run_command, debug)


def run_reporting_errors(name: str, func, debug: bool = False) -> int:
    """`func()`'s exit code; the project's errors end in one line `<name>: error: <message>` and their
    exit code, Ctrl-C in `<name>: interrupted` and 130. A bug keeps its traceback."""
    try:
        with contextlib.nullcontext() if debug else one_line_warnings(name):
            return func()
    except SPDError as err:
        if debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the exception held
        print(f"{name}: error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C: files are written atomically, so what finished is kept whole
        if debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


_PACKAGE = str(Path(__file__).resolve().parents[1])


@contextlib.contextmanager
def one_line_warnings(name: str):
    """The project's own warnings (raised from its files, or saying `spd: ...`) shown as one line
    `<name>: warning: <message>`, not Python's file:line form with a source line under it. Other
    libraries' warnings keep their form. (Not under --debug / SPD_DEBUG=1.)"""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        if not (str(filename).startswith(_PACKAGE) or text.startswith("spd: ")):
            return original(message, category, filename, lineno, file, line)
        print(f"{name}: warning: {text.removeprefix('spd: ')}", file=sys.stderr if file is None else file)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original
