import pytest

from dataset.tasks import CLASS_ORDERS, Task, TaskError, layout, step_classes


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


def test_plops_class_orders_of_15_1():
    # order b as mib_plop.md §2.1 states it: step 0 = [0, 12, 9, ..., 11], then 17, 3, 6, 18, 10
    t = Task("voc", "15-5s_b", 3)
    assert t.name == "15-1_b" and layout(t.name) == "15-1"
    assert t.base_classes == [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11]
    assert t.all_steps[1:] == [[17], [3], [6], [18], [10]]
    assert t.new_classes == [6] and t.old_classes == t.base_classes + [17, 3]
    assert t.channels([0, 12, 11, 17, 3, 6]) == [0, 1, 15, 16, 17, 18]
    assert t.classes_per_step == [16, 1, 1, 1] and t.num_steps == 6
    # 22 orders, b to w, each every VOC class once with background first
    assert sorted(CLASS_ORDERS) == [f"15-1_{chr(c)}" for c in range(ord("b"), ord("w") + 1)]
    for name in CLASS_ORDERS:
        order = Task("shapes", name, 0).order
        assert order[0] == 0 and sorted(order) == list(range(21)), name
    # the natural order is its own: channel = class id
    natural = Task("voc", "15-1", 5)
    assert natural.order == list(range(21)) and natural.channels([3, 20]) == [3, 20] and layout("15-1") == "15-1"
    with pytest.raises(TaskError, match="15-1_b ... 15-1_w"):
        Task("voc", "15-1_z", 0)
