"""Which method reads which flag: another method's flag, or a flag whose switch is off, is a
one-line error rather than a silently ignored option; preset-only methods compose like FT.

The ``FLAG_NEEDS`` tables claim "this flag has no effect while that one is off"; the loss
tests below check each claim on a method's own loss, with the switch off and the flag at two
values.
"""
import copy

import pytest
import torch

import argparser
import methods
import run
from argparser import build_parser, parse_args
from dataset.tasks import Task
from methods.classic import ClassicMethod
from methods.dkd import DKD
from methods.lgkd import LGKD
from methods.plop import PLOP
from methods.reminder import Reminder
from methods.sdr import SDR
from utils.errors import ConfigError

SHAPES = ["--dataset", "shapes", "--task", "15-1"]


def parsed(*args):
    return parse_args([*SHAPES, *args])


def error_of(*args) -> str:
    with pytest.raises(ConfigError) as info:
        parsed(*args)
    return str(info.value)


# --- another method's flag ------------------------------------------------------------------------
@pytest.mark.parametrize("args,flag,readers", [
    (["--method", "MiB", "--no_masks"], "--no_masks", "LSKD"),
    (["--method", "MiB", "--nonnegative_loss_weights"], "--nonnegative_loss_weights", "LSKD"),
    (["--method", "DKD", "--loss_kd", "10"], "--loss_kd", "MiB"),
    (["--method", "SDR", "--pod", "local"], "--pod", "PLOP"),
    (["--method", "REMINDER", "--lgkd"], "--lgkd", "LGKD"),
    (["--method", "PLOP", "--mem_size", "100"], "--mem_size", "DKD-M"),
    (["--method", "LSKD", "--csw_kd", "0.5"], "--csw_kd", "REMINDER"),
    (["--method", "DKD", "--sigmoid", "whc"], "--mask_mode", "LSKD"),  # a seed alias, named canonically
])
def test_another_methods_flag_is_refused(args, flag, readers):
    message = error_of(*args)
    assert message.startswith(f"{flag} is read by ") and readers in message
    assert f"not by --method {parsed('--method', args[1]).method}" in message


def test_refusal_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    assert run.main([*SHAPES, "--method", "MiB", "--no_masks", "--logdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no_masks" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "runs").exists()


def test_every_method_accepts_the_flags_of_its_own_and_its_bases_modules():
    """Hand-listed readers, not derived from the code under test."""
    readers = {"loss_kd": {"FT", "LWF", "LWF-MC", "ILT", "EWC", "RW", "PI", "MiB", "PLOP", "SDR", "REMINDER",
                           "LGKD", "LSKD"},
               "pod_factor": {"PLOP", "REMINDER", "LGKD", "LSKD"},
               "csw_kd": {"REMINDER"}, "lgkd": {"LGKD"}, "no_masks": {"LSKD"}, "loss_fc": {"SDR"},
               "mbce": {"DKD", "DKD-M"}}
    modules = build_parser().method_flags
    for cls in methods.all_method_classes():
        for dest, names in readers.items():
            assert (modules[dest] in cls.flag_modules()) == (cls.name in names), (cls.name, dest)


def test_a_seed_tool_may_read_method_flags_of_any_method():
    """pod_gap.py measures with POD's scales whatever the run's method."""
    args = [*SHAPES, "--method", "FT", "--spp_scales", "1", "2"]
    with pytest.raises(ConfigError):
        parse_args(args)
    assert parse_args(args, tool_reads=frozenset({"spp_scales"})).spp_scales == [1, 2]


# --- composition of preset-only methods -------------------------------------------------------------
def comparable(opts) -> dict:
    return {k: v for k, v in vars(opts).items() if k not in ("method", "name")}


def test_preset_method_plus_a_family_flag_is_ft_with_both_sets_of_flags():
    """As in the reference, where --method only presets flags: MiB + POD is PLOP's class with
    MiB's flags and without PLOP's preset (no pseudo-labels)."""
    mib_pod = parsed("--method", "MiB", "--pod", "local", "--pod_factor", "0.01")
    by_hand = parsed("--method", "FT", "--unce", "--unkd", "--loss_kd", "10", "--init_balanced",
                     "--pod", "local", "--pod_factor", "0.01")
    assert mib_pod.method_cls is by_hand.method_cls is PLOP
    assert comparable(mib_pod) == comparable(by_hand)
    assert mib_pod.pseudo is None and mib_pod.method == "MiB"
    assert parsed("--method", "EWC", "--csw_kd", "0.5").method_cls is Reminder
    assert parsed("--method", "DKD", "--mem_size", "100").method_cls.name == "DKD-M"
    # A method with behaviour of its own composes only with its subclasses.
    assert parsed("--method", "PLOP", "--csw_kd", "0.5").method_cls is Reminder


def test_behaviour_class_of_each_method():
    expected = {"FT": "ClassicMethod", "LWF": "ClassicMethod", "MiB": "ClassicMethod", "EWC": "ClassicMethod",
                "PLOP": "PLOP", "REMINDER": "Reminder", "SDR": "SDR", "DKD": "DKD", "DKD-M": "DKD"}
    for name, cls_name in expected.items():
        assert methods.get_method_class(name).behaviour_class().__name__ == cls_name, name


# --- flags whose switch is off ------------------------------------------------------------------------
@pytest.mark.parametrize("args,fragments", [
    (["--method", "FT", "--unkd"], ["--unkd has no effect while --loss_kd is 0.0", "set --loss_kd"]),
    (["--method", "PI", "--reg_alpha", "0.5"], ["--reg_alpha", "--regularizer is pi", "ewc or rw"]),
    (["--method", "EWC", "--reg_iterations", "5"], ["--reg_iterations", "--regularizer is ewc", "to rw"]),
    (["--method", "FT", "--pod", "local", "--threshold", "0.5"], ["--threshold", "--pseudo is not set"]),
    (["--method", "FT", "--pod", "local", "--pod_new_logits", "drop"], ["--pod_new_logits", "--pod_logits"]),
    (["--method", "REMINDER", "--csw_kd", "0", "--delta_csw", "1"], ["--delta_csw", "--csw_kd is 0.0"]),
    (["--method", "LwF-MC", "--icarl_bkg"], ["--icarl_bkg", "--icarl_disjoint is not set"]),
    (["--method", "LSKD", "--mcd_factor", "0", "--mcd_groups", "4"], ["--mcd_groups", "--mcd_factor is 0.0"]),
    (["--method", "LSKD", "--loss_weights_lr", "0", "--adaptivealpha", "3"],
     ["--adaptive_alpha has no effect while --loss_weights_lr is 0.0", "to anything but 0,"]),
])
def test_flag_whose_switch_is_off_is_refused(args, fragments):
    message = error_of(*args)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("args", [
    ["--method", "MiB", "--alpha", "2"],            # MiB's preset sets --loss_kd
    ["--method", "RW", "--reg_iterations", "5"],
    ["--method", "EWC", "--reg_alpha", "0.5"],
    ["--method", "PLOP", "--threshold", "0.5", "--pod_new_logits", "drop"],
    ["--method", "REMINDER", "--delta_csw", "1", "--csw_foreground_only"],
    ["--method", "LGKD", "--prev_kd", "3"],
    ["--method", "LSKD", "--adaptive_gamma", "1e-3"],                          # w learned at the step's lr
    ["--method", "LSKD", "--loss_weights_lr", "0.001", "--adaptive_beta", "1e-3"],
    ["--method", "LSKD", "--loss_weights_lr", "0"],                           # the preset's values are not refused
])
def test_flag_with_its_switch_on_is_accepted(args):
    parsed(*args)


def test_needs_tables_name_real_flags_of_the_same_readers():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    for dest, (needed, values) in parser.flag_needs.items():
        assert dest in actions and needed in actions, dest
        if dest in argparser.GENERAL_FLAG_NEEDS:
            continue
        owner, needed_owner = parser.method_flags[dest], parser.method_flags[needed]
        readers = [c for c in methods.all_method_classes() if owner in c.flag_modules()]
        assert all(needed_owner in c.flag_modules() for c in readers), dest  # whoever reads it reads the switch
        if isinstance(values, tuple):  # not AnythingBut
            assert all(v in actions[needed].choices for v in values), dest


# The claim behind each entry, on the loss: (class, flags with the switch off, dest, another value).
# Not covered here: the regulariser entries (read once by make_regularizer: PI never reads alpha,
# EWC never its iteration count; tests/test_regularizers.py), --mcd_groups (LSKD's loss needs a
# model for its blanked teacher passes; MCD is skipped at factor 0 in methods/lskd.py) and
# --adaptive_* (they enter only the weight objective, which fixed weights never compute:
# tests/test_lskd.py::test_fixed_weights_skip_the_weight_objective).
OFF = ["--method", "FT", "--loss_kd", "1"]
POD = ["--method", "FT", "--loss_kd", "1", "--pod", "local", "--pod_factor", "0.01"]
CLAIMS = [
    (PLOP, ["--method", "FT"], "alpha", 2.0),
    (PLOP, ["--method", "FT"], "unkd", True),
    (PLOP, ["--method", "FT"], "icarl_importance", 3.0),
    (PLOP, ["--method", "FT"], "icarl_disjoint", True),
    (ClassicMethod, ["--method", "LwF-MC"], "icarl_bkg", True),
    (PLOP, OFF, "pod_factor", 0.5),
    (PLOP, OFF, "pod_logits", True),
    (PLOP, OFF, "pod_prepro", "abs"),
    (PLOP, OFF, "spp_scales", [1, 2]),
    (PLOP, OFF, "no_pod_schedule", True),
    (PLOP, POD, "pod_logits_factor", 0.7),
    (PLOP, POD, "pod_new_logits", "drop"),
    (PLOP, POD, "threshold", 0.5),
    (PLOP, POD, "classif_adaptive_factor", True),
    (PLOP, POD, "pseudo_median", "exact"),
    (LGKD, OFF, "prev_kd", 3.0),
    (LGKD, OFF, "novel_kd", 4.0),
    (Reminder, POD, "csw_foreground_only", True),
    (Reminder, POD, "delta_csw", 1.0),
    (SDR, OFF, "loss_de_prototypes_sumafter", True),
    (SDR, OFF, "lfs_normalization", "max_maskedforclass"),
    (SDR, OFF, "lfs_shrinkingfn", "exponential"),
    (SDR, OFF, "lfs_loss_fn_touse", "ratio"),
    (DKD, ["--method", "DKD", "--mbce", "0"], "pos_weight", 7.0),
]


def outputs(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(2, c, 4, 4, generator=g) for c in (4, 4, 4, 8)]
    small = torch.randn(2, n, 4, 4, generator=g)
    return {"stages": stages, "body": stages[-1].relu(), "pre_logits": torch.randn(2, 6, 4, 4, generator=g),
            "logits_small": small, "logits": small.repeat_interleave(2, 2).repeat_interleave(2, 3),
            "logits_pos": torch.randn(2, n, 8, 8, generator=g), "logits_neg": torch.randn(2, n, 8, 8, generator=g)}


def loss_terms(cls, opts) -> dict:
    task = Task("shapes", "15-1", 1)
    method = cls(opts, task)
    method.thresholds = torch.full((task.n_seen,), 0.5)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :4, :4] = 16
    labels[1, 4:, 4:] = 3
    terms = method.loss({"label": labels, "image": torch.zeros(2, 3, 8, 8)}, outputs(task.n_seen, 0),
                        outputs(task.n_old, 1))
    return {k: v.item() for k, v in terms.items()}


def test_claims_cover_every_needs_entry_but_the_listed_ones():
    listed = {"reg_importance", "reg_no_normalize", "reg_alpha", "reg_iterations", "mcd_groups",
              "adaptive_alpha", "adaptive_beta", "adaptive_gamma"}
    assert {dest for _, _, dest, _ in CLAIMS} | listed == set(build_parser().flag_needs) - set(argparser.GENERAL_FLAG_NEEDS)


@pytest.mark.parametrize("cls,args,dest,value", CLAIMS, ids=[c[2] for c in CLAIMS])
def test_flag_has_no_effect_while_its_switch_is_off(cls, args, dest, value):
    opts = parsed(*args)
    other = copy.copy(opts)
    assert getattr(other, dest) != value
    setattr(other, dest, value)
    assert loss_terms(cls, opts) == loss_terms(cls, other)


@pytest.mark.parametrize("cls,args,dest,value", [(PLOP, POD, "pod_factor", 0.5), (PLOP, ["--method", "MiB"], "alpha", 2.0),
                                                (DKD, ["--method", "DKD"], "pos_weight", 7.0)])
def test_the_same_flags_change_the_loss_with_their_switch_on(cls, args, dest, value):
    """The loss comparison above can see a difference."""
    opts = parsed(*args)
    other = copy.copy(opts)
    setattr(other, dest, value)
    assert loss_terms(cls, opts) != loss_terms(cls, other)
