import pytest

from dataset.tasks import Task, TaskError, step_classes


def test_voc_15_1_steps_and_alias():
    steps = step_classes("voc", "15-5s")
    assert steps[0] == list(range(16))
    assert steps[1:] == [[16], [17], [18], [19], [20]]
    t = Task("voc", "15-5s", 3)
    assert t.name == "15-1"
    assert t.old_classes == list(range(18)) and t.new_classes == [18]
    assert t.classes_per_step == [16, 1, 1, 1] and t.n_seen == 19 and t.n_old == 18


@pytest.mark.parametrize("dataset,task,sizes", [
    ("voc", "19-1", [20, 1]),
    ("voc", "15-5", [16, 5]),
    ("voc", "10-1", [11] + [1] * 10),
    ("voc", "5-3", [6, 3, 3, 3, 3, 3]),
    ("voc", "offline", [21]),
    ("ade", "100-50", [101, 50]),
    ("ade", "100-10", [101] + [10] * 5),
    ("ade", "100-5", [101] + [5] * 10),
    ("ade", "50", [51, 50, 50]),
    ("ade", "offline", [151]),
    ("shapes", "15-1", [16, 1, 1, 1, 1, 1]),
])
def test_split_sizes(dataset, task, sizes):
    steps = step_classes(dataset, task)
    assert [len(s) for s in steps] == sizes
    flat = [c for s in steps for c in s]
    assert flat == list(range(len(flat)))  # every class once, in order


def test_future_and_base():
    t = Task("ade", "100-10", 2)
    assert t.base_classes == list(range(101))
    assert t.future_classes == list(range(121, 151))


def test_errors_name_the_fix():
    with pytest.raises(TaskError, match="choose one of"):
        Task("voc", "7-7", 0)
    with pytest.raises(TaskError, match="steps 0..5"):
        Task("voc", "15-1", 6)
    with pytest.raises(TaskError, match="unknown dataset"):
        Task("coco", "15-1", 0)
