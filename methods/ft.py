"""FT: plain fine-tuning with cross-entropy on the current labels (reference §4.1).

The classic family with no flag set, so ``--method FT`` plus classic flags composes like the
reference (``--method FT --unce --unkd --loss_kd 10 --init_balanced`` is MiB).
"""
from . import register
from .classic import ClassicMethod


@register("FT")
class FineTuning(ClassicMethod):
    """Lower bound of every table: no teacher, no regulariser; old classes are forgotten."""
