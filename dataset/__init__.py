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


def class_names(dataset: str, shapes_version: int | None = None) -> list[str] | None:
    """Display names of a dataset's labels, index = class id (None for ADE20K: ids are shown);
    ``shapes_version`` None is the default generator."""
    from . import voc
    from .incremental import DEFAULT_SHAPES_VERSION, SHAPES_GENERATORS

    shapes = SHAPES_GENERATORS[shapes_version or DEFAULT_SHAPES_VERSION]
    return {"voc": voc.CLASS_NAMES, "shapes": shapes.CLASS_NAMES}.get(dataset)


def channel_names(task: Task, shapes_version: int | None = None) -> list[str] | None:
    """Display names of a task's output channels: its classes in learning order (``class_names``
    itself in the natural order)."""
    names = class_names(task.dataset, shapes_version)
    return names and [names[c] for c in task.order]
