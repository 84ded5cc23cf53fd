"""Every command-line flag, the method presets, and the validation of flag combinations.

Method-specific flags are declared by the method modules themselves (``add_arguments`` in
``methods/*.py``); presets are data on the method classes.  Resolution order for a preset key:
explicit flag > the method's per-dataset preset > the method's preset > the flag's default.
A method reads only the flags of its own and its base classes' modules; another method's flag,
or a flag whose switch (``FLAG_NEEDS`` in the module) is off, is a one-line error.
The seed command lines of the reference repositories keep working (``--overlapped``,
``--method MIB``, ``--task 15-5s``, ``--opt_level O1``, ``--local_rank``).
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import pkgutil
from pathlib import Path

import methods
from dataset.incremental import DEFAULT_SHAPES_VERSION, SHAPES_GENERATORS
from dataset.tasks import TASKS, Task, TaskError, canonical_task
from utils.errors import ConfigError


HELP_HINT = " (see python run.py --help)"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so the CLI prints one line and exits with 2."""

    def error(self, message):
        raise ConfigError(message + HELP_HINT)


def _steps(value: str):
    return value if value == "all" else int(value)


# run.py's own flags that act only through another one (the method modules declare theirs):
# flag -> (that flag, the values it must take; () = any set value).
GENERAL_FLAG_NEEDS = {
    "ckpt": ("test", ()),
    **{f"shapes_{k}": ("dataset", ("shapes",)) for k in ("train_size", "val_size", "image_size", "seed", "version")},
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Continual (class-incremental) semantic segmentation trainer.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("benchmark")
    g.add_argument("--dataset", default="voc", help="voc | ade | shapes (synthetic, no files needed)")
    g.add_argument("--data_root", default=None, help="dataset folder (see data/README.md)")
    g.add_argument("--cache_dir", default=None, help="class-presence index cache (default: under the data root)")
    g.add_argument("--task", default="15-5", help="class split, e.g. 19-1, 15-5, 15-1, 10-1, 5-3, 100-50, 100-10")
    g.add_argument("--step", nargs="+", type=_steps, default=[0],
                   help="step(s) to run: one, several (0 1 2) or 'all'")
    g.add_argument("--overlap", "--overlapped", dest="overlap", action="store_true",
                   help="overlapped protocol (default: disjoint)")
    g.add_argument("--masking", choices=["plop", "mib"], default="plop",
                   help="label masking protocol (reference §2.3)")

    g = p.add_argument_group("data")
    g.add_argument("--crop_size", type=int, default=512)
    g.add_argument("--crop_val", action="store_false", dest="crop_val",
                   help="reference spelling: passing it evaluates full images (batch 1) instead of centre crops")
    g.add_argument("--batch_size", type=int, default=4, help="per process")
    g.add_argument("--val_batch_size", type=int, default=None, help="default: --batch_size (1 on full images)")
    g.add_argument("--num_workers", type=int, default=2)
    g.add_argument("--shapes_train_size", type=int, default=2000)
    g.add_argument("--shapes_val_size", type=int, default=300)
    g.add_argument("--shapes_image_size", type=int, default=64)
    g.add_argument("--shapes_seed", type=int, default=0)
    g.add_argument("--shapes_version", type=int, choices=sorted(SHAPES_GENERATORS), default=DEFAULT_SHAPES_VERSION,
                   help="synthetic generator: 3 (the VOC-like proxy, pool-pretrained), 2 (the same with fewer "
                        "instances per class) or 1 (the first set, one colour per class); the older ones are kept "
                        "to reproduce figures measured on them (README, Results on the synthetic benchmark)")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="resnet101",
                   choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
    g.add_argument("--output_stride", type=int, choices=[8, 16], default=16)
    g.add_argument("--norm_act", default="iabn_sync", choices=["iabn_sync", "iabn", "abn", "bn", "std"])
    g.add_argument("--head", choices=["deeplab", "dkd"], default="deeplab",
                   help="DeepLabV3 head with softmax classifiers, or DKD's sigmoid head (set by --method DKD)")
    g.add_argument("--width", type=float, default=1.0, help="channel multiplier of backbone and head")
    g.add_argument("--pooling", type=int, default=32, help="ASPP eval-time pooling window")
    g.add_argument("--pretrained", default=None, help="ImageNet weights (default pretrained/<backbone>_<norm_act>.pth.tar)")
    g.add_argument("--no_pretrained", action="store_true")
    g.add_argument("--fix_bn", action="store_true", help="freeze normalisation layers")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", nargs="+", type=int, default=[30], help="per step (value k for step k); the last value repeats")
    g.add_argument("--lr", nargs="+", type=float, default=[0.007], help="per step (value k for step k); the last value repeats")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--lr_power", type=float, default=0.9, help="poly schedule power (per iteration)")
    g.add_argument("--amp", action="store_true", help="mixed precision (autocast) in --amp_dtype")
    g.add_argument("--amp_dtype", choices=["bf16", "fp16"], default=None,
                   help="type of --amp; default bf16 where the device has it (CPU, CUDA compute capability >= 8.0), "
                        "else fp16; fp16 trains with loss scaling")
    g.add_argument("--opt_level", choices=["O0", "O1", "O2", "O3"], default=None,
                   help="apex spelling: O0 = fp32, O1/O2/O3 = --amp")
    g.add_argument("--random_seed", type=int, default=42)
    g.add_argument("--channels_last", action="store_true", help="NHWC memory format for convolutions")
    g.add_argument("--compile", action="store_true", help="torch.compile the student")

    g = p.add_argument_group("method")
    g.add_argument("--method", default="FT", help="FT, LwF, LwF-MC, ILT, EWC, RW, PI, MiB, PLOP, ...")
    p.method_flags = {}  # dest -> the module whose add_arguments declared it
    p.flag_needs = dict(GENERAL_FLAG_NEEDS)  # dest -> (the flag it acts through, the values it must take)
    for module in _method_modules():
        if hasattr(module, "add_arguments"):
            first = len(p._actions)
            module.add_arguments(p)
            p.method_flags.update({a.dest: module.__name__ for a in p._actions[first:]})
            p.flag_needs.update(getattr(module, "FLAG_NEEDS", {}))

    g = p.add_argument_group("run")
    g.add_argument("--name", default=None, help="run name (default: the method name)")
    g.add_argument("--logdir", default="runs", help="runs go to <logdir>/<dataset>/<task>-<ov|dj>/<name>/")
    g.add_argument("--step_ckpt", default=None, help="teacher checkpoint for the first requested step")
    g.add_argument("--ckpt", default=None, help="checkpoint to evaluate with --test")
    g.add_argument("--results_file", default=None, help="JSON-lines results (default: <run dir>/results.jsonl)")
    g.add_argument("--test", action="store_true", help="evaluate saved checkpoints, no training")
    g.add_argument("--overwrite", action="store_true", help="retrain steps whose checkpoint already exists; restart interrupted ones")
    g.add_argument("--val_interval", type=int, default=1, help="validate and checkpoint every N epochs")
    g.add_argument("--sample_num", type=int, default=4,
                   help="test images drawn as image | ground truth | prediction (PNG + tensorboard)")
    g.add_argument("--log_interval", type=int, default=10, help="iterations between logged losses")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _method_modules():
    for info in pkgutil.iter_modules(methods.__path__):
        if info.name != "base":
            yield importlib.import_module(f"methods.{info.name}")


def _explicit_dests(parser: argparse.ArgumentParser, argv) -> set[str]:
    """Destinations the user set on the command line (so presets never override them)."""
    shadow = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                   argparse._StoreConstAction)):
                kwargs.update(action="store_const", const=True)
            else:
                kwargs.update(nargs=action.nargs)
            shadow.add_argument(*action.option_strings, **kwargs)
    known, _ = shadow.parse_known_args(argv)
    return set(vars(known))


def family_class(chosen, opts, explicit: set[str]):
    """The class that the flags actually ask for, as the reference composes methods from flags.

    PLOP's ADE scripts say ``--method FT --pod local --pseudo entropy ...`` and LSKD's README
    ``--method FT ... --dis cos``: a subclass whose own ``selected_by`` flags were given runs
    instead (without its preset), the most derived one when several match.  A preset-only
    method counts as its behaviour class (``--method MiB --pod local`` is PLOP's class with
    MiB's flags, as in the reference, where ``--method`` only presets flags).
    """
    root = chosen.behaviour_class()
    matches = [cls for cls in methods.all_method_classes()
               if cls is not chosen and issubclass(cls, root) and not issubclass(chosen, cls)
               and any(k in explicit and getattr(opts, k, None) for k in cls.__dict__.get("selected_by", ()))]
    if not matches:
        return chosen
    deepest = [cls for cls in matches if all(issubclass(cls, other) for other in matches)]
    if not deepest:
        raise ConfigError(f"flags of several methods were combined ({', '.join(c.name for c in matches)}); "
                          "pick one with --method")
    return deepest[0]


def check_method_flags(parser: argparse.ArgumentParser, opts, explicit: set[str]) -> None:
    """Refuse another method's flag: ``--method MiB --no_masks`` would otherwise run plain MiB
    while its user believes they ran an ablation."""
    readable = opts.method_cls.flag_modules()
    for action in parser._actions:
        module = parser.method_flags.get(action.dest)
        if module is None or module in readable or action.dest not in explicit:
            continue
        readers = [cls.name for cls in methods.all_method_classes() if module in cls.flag_modules()]
        raise ConfigError(f"{action.option_strings[0]} is read by {', '.join(readers)}, not by --method "
                          f"{opts.method}; drop it, or pick one of those methods")


def check_flag_needs(parser: argparse.ArgumentParser, opts, explicit: set[str]) -> None:
    """Refuse a flag that acts only through another one that is off (``--threshold`` without
    ``--pseudo``, ``--reg_alpha`` with PI): the run would ignore it.  Presets count as set."""
    for dest, (needed, values) in parser.flag_needs.items():
        value = getattr(opts, needed)
        if dest not in explicit or (value in values if values else value):
            continue
        flag, needed_flag = _option(parser, dest), _option(parser, needed)
        state = "not set" if value is None or value is False else value
        wanted = f" to {' or '.join(values) if isinstance(values, tuple) else values}" if values else ""
        raise ConfigError(f"{flag} has no effect while {needed_flag} is {state}; set {needed_flag}{wanted}, "
                          f"or drop {flag}")


def check_contradictions(opts, explicit: set[str]) -> None:
    """run.py's flags that the run would ignore or that contradict each other."""
    if opts.head != opts.method_cls.model_head:
        raise ConfigError(f"--method {opts.method} trains the {opts.method_cls.model_head} head, not --head "
                          f"{opts.head}; drop --head")
    if opts.step_ckpt and opts.test:
        raise ConfigError("--step_ckpt is a teacher for training and --test trains nothing; evaluate a file "
                          "with --ckpt PATH")
    if opts.step_ckpt and opts.step[0] == 0:
        raise ConfigError("--step_ckpt is the teacher of the first requested step, and step 0 has none; "
                          "drop it, or start at --step 1 or later")
    if opts.pretrained and opts.no_pretrained:
        raise ConfigError("--pretrained and --no_pretrained contradict each other; keep one")
    if opts.dataset == "shapes" and "data_root" in explicit:
        raise ConfigError("--dataset shapes generates its images and reads no --data_root; drop it, or train "
                          "on a data/make_shapes.py folder with --dataset voc")
    if opts.opt_level == "O0" and opts.amp:
        raise ConfigError("--opt_level O0 trains in fp32 and --amp in mixed precision; drop one")
    if opts.test and opts.overwrite:
        raise ConfigError("--overwrite retrains steps and --test only evaluates them; drop one")


def _option(parser: argparse.ArgumentParser, dest: str) -> str:
    return next(a.option_strings[0] for a in parser._actions if a.dest == dest and a.option_strings)


def apply_preset(opts, method_cls, explicit: set[str]) -> None:
    preset = dict(getattr(method_cls, "preset", {}))
    preset.update(getattr(method_cls, "preset_by_dataset", {}).get(opts.dataset, {}))
    for key, value in preset.items():
        if not hasattr(opts, key):
            raise AssertionError(f"preset of {method_cls.__name__} sets unknown option {key}")
        if key not in explicit:
            setattr(opts, key, value)


def parse_args(argv=None, tool_reads: frozenset[str] = frozenset()):
    """Parse and validate run.py's flags.  ``tool_reads`` names method flags that the calling
    tool reads itself, whatever the method (``pod_gap.py`` measures with POD's scales)."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    explicit = _explicit_dests(parser, argv)

    try:
        opts.method_cls = methods.get_method_class(opts.method)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    opts.method = opts.method_cls.name
    apply_preset(opts, opts.method_cls, explicit)
    opts.method_cls = family_class(opts.method_cls, opts, explicit)
    check_method_flags(parser, opts, explicit - tool_reads)

    try:
        opts.task = canonical_task(opts.dataset, opts.task)
    except TaskError as exc:
        raise ConfigError(str(exc)) from None
    num_steps = Task(opts.dataset, opts.task, 0).num_steps
    if "all" in opts.step:
        if len(opts.step) > 1:
            raise ConfigError("--step all cannot be combined with step numbers")
        opts.step = list(range(num_steps))
    for s in opts.step:
        if not 0 <= s < num_steps:
            raise ConfigError(f"step {s} is out of range for {opts.dataset} {opts.task}, which has steps "
                              f"0..{num_steps - 1}; pass --step between 0 and {num_steps - 1}")
    if sorted(set(opts.step)) != opts.step:
        raise ConfigError("--step values must be increasing and distinct, e.g. --step 0 1 2")

    check_flag_needs(parser, opts, explicit - tool_reads)
    check_contradictions(opts, explicit)

    if opts.opt_level is not None:
        opts.amp = opts.amp or opts.opt_level != "O0"
    if opts.amp_dtype and not opts.amp:
        raise ConfigError(f"--amp_dtype {opts.amp_dtype} sets the type of --amp; add --amp (or drop --amp_dtype)")
    if opts.norm_act == "std":
        opts.norm_act = "bn"
    if opts.name is None:
        opts.name = opts.method
    if opts.name in ("", ".", "..") or "/" in opts.name or os.sep in opts.name:
        raise ConfigError(f"--name {opts.name!r} must name one folder under LOGDIR/DATASET/TASK-PROTOCOL (no '/', "
                          "not empty, '.' or '..'); use --logdir to put runs elsewhere")
    if opts.val_batch_size is None:
        opts.val_batch_size = opts.batch_size if opts.crop_val else 1
    if opts.dataset != "shapes" and opts.data_root is None:
        raise ConfigError(f"--data_root is required for --dataset {opts.dataset}; see data/README.md "
                          "for the expected layout (or use --dataset shapes)")
    if any(v <= 0 for v in opts.epochs) or any(v <= 0 for v in opts.lr):
        raise ConfigError("--epochs and --lr values must be positive")
    check_numbers(parser, opts)
    if opts.test and opts.ckpt and len(opts.step) > 1:
        raise ConfigError("--ckpt evaluates one checkpoint: pass a single --step with it")
    return opts


# Bounds of the numeric flags: dest -> (lowest allowed value, whether the bound itself is excluded).
NUMERIC_BOUNDS = {
    "batch_size": (1, False), "val_batch_size": (1, False), "crop_size": (1, False), "num_workers": (0, False),
    "shapes_train_size": (1, False), "shapes_val_size": (1, False), "shapes_image_size": (8, False),
    "shapes_seed": (0, False),
    "log_interval": (1, False), "val_interval": (1, False), "sample_num": (0, False), "pooling": (1, False),
    "width": (0, True), "momentum": (0, False), "weight_decay": (0, False), "lr_power": (0, False),
    "mem_size": (0, False), "mcd_groups": (1, False),
}


def check_numbers(parser: argparse.ArgumentParser, opts) -> None:
    """Every float flag finite, every bounded flag within its bound: a one-line error now rather
    than a traceback (or a silent nonsense run) later."""
    for action in parser._actions:
        value = getattr(opts, action.dest, None)
        if action.type is float and value is not None:
            for v in value if isinstance(value, list) else [value]:
                if not math.isfinite(v):
                    raise ConfigError(f"--{action.dest} must be a finite number, got {v}")
    check_bounds(opts, NUMERIC_BOUNDS)


def check_bounds(values, bounds: dict[str, tuple[float, bool]]) -> None:
    """Every flag of ``bounds`` (dest -> (lowest value, whether the bound itself is excluded))
    finite and within its bound; a flag that is None or absent is not checked."""
    for dest, (low, strict) in bounds.items():
        value = getattr(values, dest, None)
        if value is None:
            continue
        if not math.isfinite(value):
            raise ConfigError(f"--{dest} must be a finite number, got {value}")
        if value <= low if strict else value < low:
            raise ConfigError(f"--{dest} must be {'>' if strict else '>='} {low}, got {value}")


def per_step(values: list, step: int):
    """Value of a per-step flag for step ``step``; the last value repeats.

    ``--lr 0.01 0.001`` means 0.01 at step 0 and 0.001 at every later step, whichever steps a
    command runs, so per-step launches (``--step 3``) and ``--step all`` agree.
    """
    return values[min(step, len(values) - 1)]


def run_dir(opts) -> Path:
    """Checkpoints, logs and results of one setting; the path names everything that matters."""
    protocol = "ov" if opts.overlap else "dj"
    return Path(opts.logdir) / opts.dataset / f"{opts.task}-{protocol}" / opts.name


def known_datasets() -> list[str]:
    return sorted(TASKS)
