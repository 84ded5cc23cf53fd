"""Data layer: tasks, dataset splits on disk or generated, step subsets with masked labels.

The trainer needs one call, :func:`build_datasets`; the rest is exported for tools and tests.
"""
from .errors import DataError
from .incremental import DataOptions, IncrementalSegmentation, build_datasets, label_lut
from .tasks import Task, TaskError

__all__ = [
    "DataError",
    "DataOptions",
    "IncrementalSegmentation",
    "Task",
    "TaskError",
    "build_datasets",
    "label_lut",
]
