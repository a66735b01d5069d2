"""The project's own exceptions: a user's mistake or a bad file, never a bug. The CLI turns each into
one line, `spd <command>: error: <message>`, and the exit code below; anything else is a bug and
keeps its traceback. They subclass the built-in exception a Python caller would expect (ValueError,
RuntimeError), so `except ValueError` keeps working.

Exit codes (README "Exit codes"): 0 done; 1 `spd data check` found problems; 2 bad arguments,
settings or input; 3 bad or missing data; 4 bad, missing or mismatched model / checkpoint;
75 a training run stopped by SIGTERM or SIGINT after saving (resume it with --resume).
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a scheduler may requeue the job


class SPDError(Exception):
    """Base of the project's user-facing errors."""

    exit_code = EXIT_USAGE


class UserInputError(SPDError, ValueError):
    """An argument, a point, an image or an intrinsics value the user gave is not usable."""


class ConfigError(SPDError, ValueError):
    """A configuration (YAML file or --set) has an unknown key, a wrong type or a value out of range."""


class RunFolderError(SPDError, RuntimeError):
    """A run folder is in use, already holds a run, or does not match the run being resumed."""


class DataLayoutError(SPDError, ValueError):
    """A dataset root, list or file does not exist or is not what the layout promises."""

    exit_code = EXIT_DATA
