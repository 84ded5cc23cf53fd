"""FT: plain fine-tuning with cross-entropy on the current labels (reference §4.1)."""
from . import register
from .base import Method


@register("FT")
class FineTuning(Method):
    """Lower bound of every table: no teacher, no regulariser; old classes are forgotten."""
