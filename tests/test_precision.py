"""Mixed precision (train.Precision): --amp_dtype bf16|fp16, fp16 loss scaling on the CPU, skipped
overflowing steps, and the loss scaler's state through a checkpoint."""
from __future__ import annotations

import pytest
import torch

from argparser import parse_args
from dataset.tasks import Task
from segmentation_module import make_model
from test_cli import TINY, assert_user_error, cli
from train import MIN_LOSS_SCALE, Precision, Trainer
from utils import checkpoint
from utils.errors import ConfigError, NaNLossError

CPU = torch.device("cpu")
MODEL = ["--dataset", "shapes", "--task", "15-1", "--method", "FT", "--backbone", "resnet18", "--width", "0.125",
         "--norm_act", "abn", "--no_pretrained"]


def _trainer(*precision: str, seed: int = 0) -> Trainer:
    opts = parse_args([*MODEL, *precision])
    task = Task("shapes", "15-1", 0)
    torch.manual_seed(seed)
    model = make_model(opts, task.classes_per_step)
    return Trainer(model, None, opts.method_cls(opts, task), opts, CPU, lr=0.01, iters_per_epoch=100, epochs=1)


def _batches(count: int, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 batches as the loader yields them: an image whose colour tells the class of its
    left half, background on the right, so a few steps of training lower the loss."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        classes = torch.randint(1, 16, (4,), generator=g)
        images = torch.randint(0, 60, (4, 3, size, size), generator=g, dtype=torch.uint8)
        labels = torch.zeros(4, size, size, dtype=torch.uint8)
        for b, c in enumerate(classes.tolist()):
            images[b, c % 3, :, : size // 2] += 12 * c
            labels[b, :, : size // 2] = c
        batches.append((images, labels))
    return batches


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_amp_dtype_choices_and_defaults():
    assert parse_args([*MODEL, "--amp"]).amp_dtype is None
    default = Precision(CPU, True)
    assert default.dtype == torch.bfloat16 and not default.loss_scaling and not default.scaler().is_enabled()
    fp16 = Precision(CPU, True, "fp16")
    assert fp16.dtype == torch.float16 and fp16.loss_scaling and fp16.scaler().is_enabled()
    with fp16.autocast():
        assert torch.nn.functional.linear(torch.ones(1, 2), torch.ones(3, 2)).dtype == torch.float16
    assert not Precision(CPU, False, "fp16").scaler().is_enabled()  # no --amp: plain fp32
    copy = Precision(CPU, True, "fp16").inference_copy(make_model(parse_args(MODEL), [16]))
    assert next(copy.body.parameters()).dtype == torch.float16  # the frozen copy follows the chosen type
    with pytest.raises(ConfigError, match="add --amp"):
        parse_args([*MODEL, "--amp_dtype", "fp16"])


def test_amp_dtype_without_amp_is_a_one_line_error(tmp_path):
    proc = cli(*TINY, "--task", "15-1", "--amp_dtype", "fp16", "--logdir", str(tmp_path))
    assert_user_error(proc, "--amp_dtype fp16", "add --amp")
    assert not any(tmp_path.iterdir())


def test_overflowing_fp16_step_is_skipped_and_the_scale_halved():
    trainer = _trainer("--amp", "--amp_dtype", "fp16")
    # A scale no gradient survives in fp16 (the state a resumed checkpoint would restore).
    trainer.scaler.load_state_dict({"scale": 2.0 ** 40, "growth_factor": 2.0, "backoff_factor": 0.5,
                                    "growth_interval": 2000, "_growth_tracker": 0})
    before = _weights(trainer)
    stats = trainer.train_epoch(_batches(1), epoch=0)  # must not stop as a diverged run
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(trainer)))
    # Momentum untouched too; torch's fused SGD left it uninitialised after a skipped first step.
    assert all(not s["momentum_buffer"].any() for s in trainer.optimizer.state.values())
    assert trainer.scaler.get_scale() == 2.0 ** 39
    assert torch.isfinite(torch.tensor(stats["loss"]))  # the loss itself was fine: the gradients overflowed
    # Once the scale fits, steps apply again.
    trainer.scaler.update(2.0 ** 10)
    trainer.train_epoch(_batches(1), epoch=1)
    after = _weights(trainer)
    assert not all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(w).all() for w in after)


def test_non_finite_fp16_loss_is_skipped_but_stops_fp32():
    """A forward that overflows fp16 (activations above 65504) gives a NaN loss: the scaler skips
    the step and the run goes on; the same NaN in fp32 has reached the weights and stops the run."""
    trainer = _trainer("--amp", "--amp_dtype", "fp16")
    conv1 = trainer.model.body.conv1 if hasattr(trainer.model.body, "conv1") else None
    first = conv1 if conv1 is not None else next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        first.weight.mul_(1e6)
    before = _weights(trainer)
    stats = trainer.train_epoch(_batches(2), epoch=0)
    assert stats["loss"] != stats["loss"]  # NaN: no step of this epoch was applied
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(trainer)))
    assert trainer.scaler.get_scale() == 2.0 ** 14  # halved twice from 65536

    fp32 = _trainer()
    original = fp32.method.loss
    fp32.method.loss = lambda batch, out, t: {k: v * float("nan") for k, v in original(batch, out, t).items()}
    with pytest.raises(NaNLossError, match="the loss became nan"):
        fp32.train_epoch(_batches(1), epoch=0)


def test_fp16_stops_when_overflow_drives_the_scale_below_one():
    trainer = _trainer("--amp", "--amp_dtype", "fp16")
    trainer.scaler.load_state_dict({"scale": 2 * MIN_LOSS_SCALE, "growth_factor": 2.0, "backoff_factor": 0.5,
                                    "growth_interval": 2000, "_growth_tracker": 0})
    original = trainer.method.loss
    trainer.method.loss = lambda batch, out, t: {k: v * float("inf") for k, v in original(batch, out, t).items()}
    with pytest.raises(NaNLossError, match="--amp_dtype bf16"):
        trainer.train_epoch(_batches(3), epoch=0)
    assert trainer.scaler.get_scale() < MIN_LOSS_SCALE


def test_loss_scaler_state_survives_a_checkpoint(tmp_path):
    trainer = _trainer("--amp", "--amp_dtype", "fp16")
    trainer.scaler.load_state_dict({"scale": 2.0 ** 40, "growth_factor": 2.0, "backoff_factor": 0.5,
                                    "growth_interval": 3, "_growth_tracker": 0})
    trainer.train_epoch(_batches(1), epoch=0)  # overflow: 2^39
    trainer.scaler.update(2.0 ** 8)
    trainer.train_epoch(_batches(2), epoch=1)  # two good steps: growth tracker 2
    checkpoint.save_atomic({"trainer": trainer.state_dict()}, tmp_path / "ckpt.pth")
    resumed = _trainer("--amp", "--amp_dtype", "fp16", seed=1)
    resumed.load_state_dict(checkpoint.load(tmp_path / "ckpt.pth")["trainer"])
    assert resumed.scaler.get_scale() == 2.0 ** 8
    assert resumed.scaler.state_dict()["_growth_tracker"] == 2
    resumed.train_epoch(_batches(1), epoch=2)  # the third good step grows the scale, as uninterrupted
    assert resumed.scaler.get_scale() == 2.0 ** 9


def test_fp16_and_bf16_training_follow_fp32():
    """Same initial weights, same 12 batches: the first loss (no update yet) agrees within 1 % and
    all three types learn alike.  fp16 skips its first overflowing steps (the scale starts at
    2^16, too high for this model) and then trains."""
    losses = {}
    for name, flags in {"fp32": (), "bf16": ("--amp",), "fp16": ("--amp", "--amp_dtype", "fp16")}.items():
        trainer = _trainer(*flags)
        losses[name] = torch.tensor([trainer.train_epoch([b], epoch=i)["loss"] for i, b in enumerate(_batches(12))])
        if name == "fp16":
            assert 2.0 ** 12 <= trainer.scaler.get_scale() < 2.0 ** 16  # a few skipped steps, no more
    for name, loss in losses.items():
        torch.testing.assert_close(loss[0], losses["fp32"][0], rtol=0.01, atol=0)
        assert loss[-3:].mean() < 0.85 * loss[0], (name, loss)


def _run_steps(tmp_path, *flags) -> tuple[list[dict], dict]:
    import json

    import run

    args = [*TINY, "--task", "15-1", "--overlap", "--method", "MiB", "--step", "0", "1", "--logdir", str(tmp_path),
            *flags]
    assert run.main(args) == 0
    run_dir = tmp_path / "shapes" / "15-1-ov" / "MiB"
    results = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    return results, checkpoint.load(run_dir / "step-1.pth")


def test_fp16_run_end_to_end_saves_its_loss_scale(tmp_path):
    """Steps 0 and 1 (MiB: teacher and distillation) train in fp16 on the CPU; the step checkpoint
    holds the loss scaler's state, and every weight is finite."""
    results, ckpt = _run_steps(tmp_path, "--amp", "--amp_dtype", "fp16")
    assert [r["step"] for r in results] == [0, 1] and all(0 <= r["miou_all"] <= 1 for r in results)
    assert 1 <= ckpt["trainer"]["scaler"]["scale"] <= 2.0 ** 16
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_amp_run_end_to_end_on_inplace_abn_package(inplace_abn, tmp_path, monkeypatch):
    """With inplace-abn installed, --amp (bf16 on the CPU) trains and tests steps 0 and 1 through
    the package's compiled kernels (it crashed at the first forward before)."""
    calls = {"n": 0}
    forward = inplace_abn.InPlaceABN.forward

    def counting(self, x):
        calls["n"] += 1
        return forward(self, x)

    monkeypatch.setattr(inplace_abn.InPlaceABN, "forward", counting)
    results, ckpt = _run_steps(tmp_path, "--amp", "--norm_act", "iabn")
    assert [r["step"] for r in results] == [0, 1]
    assert calls["n"] > 100  # the compiled layers ran (training, teacher and evaluation passes)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
