"""Class-incremental task definitions: which classes each step of a benchmark adds.

Every benchmark of the field learns classes in their natural id order: step 0 learns background
plus the first ``base`` foreground classes, each later step the next ``increment`` classes.  So a
task is one row of data, ``(base, increment)``; aliases keep the reference spellings working
(``15-5s`` is MiB's name for 15-1, ``50`` is ADE 50-50).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

# Number of label values of each dataset, background 0 included (255 is "ignore").
NUM_CLASSES = {"voc": 21, "shapes": 21, "ade": 151}

# task name -> (number of foreground classes learned at step 0, classes added per later step)
_VOC_TASKS = {
    "offline": (20, 0),
    "19-1": (19, 1),
    "15-5": (15, 5),
    "15-1": (15, 1),
    "10-1": (10, 1),
    "5-3": (5, 3),
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
ALIASES = {"15-5s": "15-1", "50": "50-50", "10-10s": "10-1"}

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


class TaskError(ValueError):
    """A dataset/task/step combination that does not exist."""


def canonical_task(dataset: str, name: str) -> str:
    if dataset not in TASKS:
        raise TaskError(f"unknown dataset '{dataset}'; choose one of {', '.join(sorted(TASKS))}")
    name = ALIASES.get(name, name)
    if name not in TASKS[dataset]:
        known = ", ".join(TASKS[dataset])
        raise TaskError(f"unknown task '{name}' for dataset {dataset}; choose one of {known}")
    return name


def step_classes(dataset: str, name: str) -> list[list[int]]:
    """Class ids learned at every step; background 0 belongs to step 0."""
    base, inc = TASKS[dataset][canonical_task(dataset, name)]
    total = NUM_CLASSES[dataset] - 1
    steps = [list(range(0, base + 1))]
    first = base + 1
    while inc and first <= total:
        steps.append(list(range(first, min(first + inc, total + 1))))
        first += inc
    return steps


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

    def at(self, step: int) -> "Task":
        return Task(self.dataset, self.name, step)
