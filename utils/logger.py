"""Rank-0 logging: console lines, a text log file and tensorboard scalars / figures / text."""
from __future__ import annotations

import sys
from pathlib import Path


class Logger:
    """Everything is a no-op on ranks other than 0, so callers never branch on the rank."""

    def __init__(self, directory: Path | None, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if enabled and directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self.file = open(directory / "log.txt", "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=str(directory / "tb"))

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stdout, flush=True)
            if self.file:
                self.file.write(message + "\n")

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def figure(self, tag: str, figure, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_figure(tag, figure, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
