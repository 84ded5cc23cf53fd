"""FT: plain fine-tuning with cross-entropy on the current labels (reference §4.1).

FT *is* the classic family's class with no flag set, so ``--method FT`` plus family flags
composes like the reference: ``--method FT --unce --unkd --loss_kd 10 --init_balanced`` is MiB,
and ``--method FT --pod local --pseudo entropy`` (PLOP's ADE scripts) selects PLOP's class.
"""
from . import register
from .classic import ClassicMethod

FineTuning = register("FT")(ClassicMethod)
