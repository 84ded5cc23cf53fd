"""One DDP iteration on 2 gloo processes x 2 images == 1 process on the same 4 images."""

import torch
import torch.distributed as dist

from dataset.tasks import Task
from methods import get_method_class
from segmentation_module import make_model
from train import Trainer
from gloo import run_on_gloo


def _opts():
    from argparser import parse_args

    return parse_args(["--dataset", "shapes", "--task", "15-1", "--backbone", "resnet18", "--width", "0.125",
                       "--norm_act", "iabn_sync", "--no_pretrained", "--method", "FT"])


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 40, generator=g)
    labels = torch.randint(0, 16, (4, 32, 40), generator=g)
    labels[:, :3, :] = 255
    return images, labels


def _one_iteration(rank: int, world: int, group) -> dict:
    torch.manual_seed(0)
    task = Task("shapes", "15-1", 0)
    opts = _opts()
    model = make_model(opts, task.classes_per_step, bn_group=group)
    student = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    method = get_method_class("FT")(opts, task)
    trainer = Trainer(student, None, method, opts, torch.device("cpu"), lr=0.01, iters_per_epoch=10, epochs=1)
    images, labels = _batch()
    per = 4 // world
    shard = slice(rank * per, (rank + 1) * per)
    trainer.train_step({"image": images[shard], "label": labels[shard]})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, world, out_path):
    state = _one_iteration(rank, world, dist.group.WORLD)
    if rank == 0:
        torch.save(state, out_path)


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "ddp.pt"
    run_on_gloo(_worker, 2, str(out))
    two = torch.load(out)
    one = _one_iteration(0, 1, None)
    assert one.keys() == two.keys()
    changed = 0
    for key in one:
        if one[key].is_floating_point():
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=key)
            changed += 1
    assert changed > 10
    # the iteration really moved the weights (otherwise equality would prove nothing)
    torch.manual_seed(0)
    fresh = make_model(_opts(), Task("shapes", "15-1", 0).classes_per_step).state_dict()
    assert not torch.allclose(fresh["cls.0.weight"], one["cls.0.weight"])


def test_cpu_threads_leave_a_core_to_the_data_pipeline_per_rank(monkeypatch):
    """torch's one-thread-per-core default would oversubscribe data workers and local ranks."""
    import utils.distributed as ud

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.setattr(ud, "available_cpus", lambda: 8)
        assert ud.share_cpus(torch.device("cpu")) == 7
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert ud.share_cpus(torch.device("cpu")) == 3
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        assert ud.share_cpus(torch.device("cpu")) == 1  # never below one
        torch.set_num_threads(5)
        assert ud.share_cpus(torch.device("cuda", 0)) == 5  # GPU runs keep torch's choice
        monkeypatch.setenv("OMP_NUM_THREADS", "7")
        assert ud.share_cpus(torch.device("cpu")) == 5  # the user's setting wins
    finally:
        torch.set_num_threads(before)
