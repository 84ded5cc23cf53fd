"""The argument parser of the tools beside run.py."""
from __future__ import annotations

import argparse


class ToolParser(argparse.ArgumentParser):
    """The parser of a tool beside run.py: an error is one line and exit code 2, as run.py's are
    (the usage stays in --help)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        hint = "" if message.endswith("--help)") else f" (see {self.prog} --help)"  # run.py's errors name their own
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")
