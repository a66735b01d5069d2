"""The `spd` command line: one module per sub-command (its arguments in `add_parser`, its work in
`run`), shared argument types in `args`, the entry point and the error reporter in `main`."""

from spd.cli.main import build_parser, main, run_reporting_errors

__all__ = ["build_parser", "main", "run_reporting_errors"]
