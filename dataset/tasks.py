"""Class-incremental task definitions: which classes each step of a benchmark adds.

Every benchmark of the field learns classes in their natural id order: step 0 learns background
plus the first ``base`` foreground classes, each later step the next ``increment`` classes.  So a
task is one row of data, ``(base, increment)``; aliases keep the reference spellings working
(``15-5s`` is MiB's name for 15-1, ``50`` is ADE 50-50).  PLOP's class-order study adds 22 random
orders of VOC 15-1 (``15-1_b`` ... ``15-1_w``, PLOP's ``15-5s_b`` ...): the same steps over a
permutation of the classes.

Class ids here are the dataset's.  A model's output channel of a class is its place in the learning
order (``Task.channels``), which is the id itself in the natural order.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from utils.errors import UserError

# Number of label values of each dataset, background 0 included (255 is "ignore").
NUM_CLASSES = {"voc": 21, "shapes": 21, "ade": 151}

# PLOP's random class orders of VOC 15-1 (its tasks.py, ``15-5s_b`` ... ``15-5s_w``; the paper's
# class-order experiment): every class in learning order, background first.  Step 0 learns the
# first 16 entries, each later step one more.
CLASS_ORDERS = {
    "15-1_b": (0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11, 17, 3, 6, 18, 10),
    "15-1_c": (0, 13, 19, 15, 17, 9, 8, 5, 20, 4, 3, 10, 11, 18, 16, 7, 12, 14, 6, 1, 2),
    "15-1_d": (0, 15, 3, 2, 12, 14, 18, 20, 16, 11, 1, 19, 8, 10, 7, 17, 6, 5, 13, 9, 4),
    "15-1_e": (0, 7, 5, 3, 9, 13, 12, 14, 19, 10, 2, 1, 4, 16, 8, 17, 15, 18, 6, 11, 20),
    "15-1_f": (0, 7, 13, 5, 11, 9, 2, 15, 12, 14, 3, 20, 1, 16, 4, 18, 8, 6, 10, 19, 17),
    "15-1_g": (0, 7, 5, 9, 1, 15, 18, 14, 3, 20, 10, 4, 19, 11, 17, 16, 12, 8, 6, 2, 13),
    "15-1_h": (0, 12, 9, 19, 6, 4, 10, 5, 18, 14, 15, 16, 3, 8, 7, 11, 13, 2, 20, 17, 1),
    "15-1_i": (0, 13, 10, 15, 8, 7, 19, 4, 3, 16, 12, 14, 11, 5, 20, 6, 2, 18, 9, 17, 1),
    "15-1_j": (0, 1, 14, 9, 5, 2, 15, 8, 20, 6, 16, 18, 7, 11, 10, 19, 3, 4, 17, 12, 13),
    "15-1_k": (0, 16, 13, 1, 11, 12, 18, 6, 14, 5, 3, 7, 9, 20, 19, 15, 4, 2, 10, 8, 17),
    "15-1_l": (0, 10, 7, 6, 19, 16, 8, 17, 1, 14, 4, 9, 3, 15, 11, 12, 2, 18, 20, 13, 5),
    "15-1_m": (0, 18, 4, 14, 17, 12, 10, 7, 3, 9, 1, 8, 15, 6, 13, 2, 5, 11, 20, 16, 19),
    "15-1_n": (0, 5, 4, 13, 18, 14, 10, 19, 15, 7, 9, 3, 2, 8, 16, 20, 1, 12, 11, 6, 17),
    "15-1_o": (0, 9, 12, 13, 18, 7, 1, 15, 17, 10, 8, 4, 5, 20, 16, 6, 14, 19, 11, 2, 3),
    "15-1_p": (0, 9, 12, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6, 14, 19, 1, 7, 3),
    "15-1_q": (0, 3, 14, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6, 12, 19, 1, 7, 9),
    "15-1_r": (0, 3, 14, 13, 1, 2, 11, 15, 17, 7, 8, 4, 5, 9, 16, 19, 12, 6, 18, 10, 20),
    "15-1_s": (0, 3, 14, 6, 1, 2, 11, 12, 17, 7, 20, 4, 5, 9, 16, 19, 15, 13, 18, 10, 8),
    "15-1_t": (0, 3, 15, 13, 1, 2, 11, 18, 17, 7, 20, 8, 5, 9, 16, 19, 14, 6, 12, 10, 4),
    "15-1_u": (0, 3, 15, 13, 14, 6, 11, 18, 17, 7, 20, 8, 4, 9, 16, 10, 1, 2, 12, 19, 5),
    "15-1_v": (0, 1, 2, 12, 14, 6, 19, 18, 17, 5, 20, 8, 4, 9, 16, 10, 3, 15, 13, 11, 7),
    "15-1_w": (0, 1, 2, 12, 14, 13, 19, 18, 7, 11, 20, 8, 4, 9, 16, 10, 3, 15, 6, 5, 17),
}

# task name -> (number of foreground classes learned at step 0, classes added per later step)
_VOC_TASKS = {
    "offline": (20, 0),
    "19-1": (19, 1),
    "15-5": (15, 5),
    "15-1": (15, 1),
    "10-1": (10, 1),
    "5-3": (5, 3),
    **dict.fromkeys(CLASS_ORDERS, (15, 1)),
}
TASKS = {
    "voc": _VOC_TASKS,
    "shapes": _VOC_TASKS,  # the synthetic set mirrors VOC's 20 foreground classes
    "ade": {
        "offline": (150, 0),
        "100-50": (100, 50),
        "100-10": (100, 10),
        "100-5": (100, 5),
        "50-50": (50, 50),
    },
}
ALIASES = {"15-5s": "15-1", "50": "50-50", "10-10s": "10-1",
           **{name.replace("15-1", "15-5s"): name for name in CLASS_ORDERS}}

# Training images of each step of VOC's tasks, (task, overlap) -> per step: the counts of MiB's
# shipped caches of ``train_aug`` (10 582 images; reference/mib_plop.md §2.2).  What the synthetic
# set's increments are sized after, and what scripts/gpu_check.py projects the paper schedule from.
VOC_TRAIN_IMAGES = {
    ("19-1", False): (10034, 548),
    ("19-1", True): (10410, 548),
    ("15-5", False): (8437, 2145),
    ("15-5", True): (9568, 2145),
    ("15-1", False): (8437, 378, 299, 420, 500, 548),
    ("15-1", True): (9568, 487, 299, 491, 500, 548),
}


class TaskError(UserError, ValueError):
    """A dataset/task/step combination that does not exist."""


def canonical_task(dataset: str, name: str) -> str:
    if dataset not in TASKS:
        raise TaskError(f"unknown dataset '{dataset}'; choose one of {', '.join(sorted(TASKS))}")
    name = ALIASES.get(name, name)
    if name not in TASKS[dataset]:
        known = ", ".join(t for t in TASKS[dataset] if t not in CLASS_ORDERS)
        if dataset != "ade":
            known += f", or PLOP's orders of 15-1, {min(CLASS_ORDERS)} ... {max(CLASS_ORDERS)}"
        raise TaskError(f"unknown task '{name}' for dataset {dataset}; choose one of {known}")
    return name


def step_classes(dataset: str, name: str) -> list[list[int]]:
    """Class ids learned at every step; background 0 belongs to step 0."""
    name = canonical_task(dataset, name)
    base, inc = TASKS[dataset][name]
    order = CLASS_ORDERS.get(name, range(NUM_CLASSES[dataset]))
    steps = [list(order[: base + 1])]
    first = base + 1
    while inc and first < len(order):
        steps.append(list(order[first: first + inc]))
        first += inc
    return steps


def layout(name: str) -> str:
    """The natural-order task whose steps an ordered task follows (``15-1_b`` -> ``15-1``), which
    keys per-task settings such as LGKD's weights; any other task is its own."""
    return name.split("_")[0] if name in CLASS_ORDERS else name


@dataclass(frozen=True)
class Task:
    """One step of one benchmark: what is old, what is new, what has been seen."""

    dataset: str
    name: str
    step: int

    def __post_init__(self):
        object.__setattr__(self, "name", canonical_task(self.dataset, self.name))
        if not 0 <= self.step < self.num_steps:
            raise TaskError(
                f"step {self.step} is out of range for {self.dataset} {self.name}, which has steps "
                f"0..{self.num_steps - 1}; pass --step between 0 and {self.num_steps - 1}"
            )

    @cached_property
    def all_steps(self) -> list[list[int]]:
        return step_classes(self.dataset, self.name)

    @property
    def num_steps(self) -> int:
        return len(step_classes(self.dataset, self.name))

    @property
    def num_classes(self) -> int:
        """Size of the dataset's label space (21 for VOC, 151 for ADE)."""
        return NUM_CLASSES[self.dataset]

    @property
    def new_classes(self) -> list[int]:
        return list(self.all_steps[self.step])

    @property
    def old_classes(self) -> list[int]:
        """Classes of steps < t, background included (empty at step 0)."""
        return [c for s in self.all_steps[: self.step] for c in s]

    @property
    def seen_classes(self) -> list[int]:
        return self.old_classes + self.new_classes

    @property
    def future_classes(self) -> list[int]:
        return [c for s in self.all_steps[self.step + 1 :] for c in s]

    @property
    def base_classes(self) -> list[int]:
        """Step-0 classes (background included): the 'old' group of the final report."""
        return list(self.all_steps[0])

    @property
    def classes_per_step(self) -> list[int]:
        """Output channels of each per-step classifier up to this step, e.g. 15-1 step 2: [16, 1, 1]."""
        return [len(s) for s in self.all_steps[: self.step + 1]]

    @property
    def n_old(self) -> int:
        return len(self.old_classes)

    @property
    def n_new(self) -> int:
        return len(self.new_classes)

    @property
    def n_seen(self) -> int:
        return len(self.seen_classes)

    @cached_property
    def order(self) -> list[int]:
        """Every class in learning order: the class of each output channel."""
        return [c for s in self.all_steps for c in s]

    @cached_property
    def _channel_of(self) -> dict[int, int]:
        return {c: i for i, c in enumerate(self.order)}

    def channels(self, classes: list[int]) -> list[int]:
        """The output channels of ``classes`` (the ids themselves in the natural order)."""
        return [self._channel_of[c] for c in classes]

    def at(self, step: int) -> "Task":
        return Task(self.dataset, self.name, step)
