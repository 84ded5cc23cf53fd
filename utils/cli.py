"""The command-line surface shared by run.py and the tools beside it: their argument parser, and
how a problem the user can fix ends them (one line on stderr, exit code 2)."""
from __future__ import annotations

import argparse
import sys

from .errors import UserError


class ToolParser(argparse.ArgumentParser):
    """The parser of a tool beside run.py: an error is one line and exit code 2, as run.py's are
    (the usage stays in --help)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        hint = "" if message.endswith("--help)") else f" (see {self.prog} --help)"  # run.py's errors name their own
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def one_line(exc: Exception) -> str:
    """The message of an error, also when a DataLoader worker wrapped it in its traceback."""
    message = str(exc).strip()
    if "Original Traceback" in message:
        last = message.splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message


def script_main(main) -> None:
    """Run a tool's ``main`` as run.py runs its own and exit: with its return value (None: 0), or
    with one line and exit code 2 on a user error."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)
