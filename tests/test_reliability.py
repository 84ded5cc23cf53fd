"""Reliability: exact resume under faults, verified checkpoints, and every bad input a clean error.

Each bad input must end with exit code 2, exactly one line on stderr naming the problem, no
traceback, and nothing on disk overwritten.  The fault-injection runs (scripts/chaos.py) kill a
real run at several moments, including inside a checkpoint write, and compare the resumed run's
files with an uninterrupted run's byte for byte.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import chaos  # noqa: E402
import run  # noqa: E402
from utils import checkpoint  # noqa: E402
from utils.errors import CheckpointError  # noqa: E402

ON_DISK = ["--task", "15-1", "--overlap", "--backbone", "resnet18", "--width", "0.125", "--norm_act", "abn",
           "--no_pretrained", "--crop_size", "32", "--batch_size", "4", "--num_workers", "0", "--lr", "0.01",
           "--sample_num", "0", "--no_progress"]  # with --dataset voc on a data/make_shapes.py folder
TINY = ["--dataset", "shapes", *ON_DISK, "--shapes_image_size", "32", "--shapes_train_size", "48",
        "--shapes_val_size", "16"]
RUN = Path("shapes/15-1-ov/FT")


def one_error_line(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def files(folder: Path) -> dict:
    """The bytes of every checkpoint, results and memory file (logs may grow, temp files go)."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.suffix in (".pth", ".jsonl", ".json")}


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread, as the subprocesses do (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop(checkpoint.KILL_IN_SAVE_ENV, None)
    return env


@pytest.fixture
def interrupted(tmp_path, monkeypatch, capsys):
    """Step 0 of FT stopped after 2 of 3 epochs: ``step-0.last.pth`` holds epoch 1."""
    from train import Trainer

    args = [*TINY, "--epochs", "3", "--logdir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")]
    original = Trainer.train_epoch

    def stop_at_epoch_2(self, loader, epoch, progress=None):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, loader, epoch, progress)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_epoch", stop_at_epoch_2)
        assert run.main(args) == 130
    capsys.readouterr()
    assert (tmp_path / RUN / "step-0.last.pth").is_file()
    return args, tmp_path / RUN


@pytest.fixture(scope="module")
def step0(tmp_path_factory):
    """A finished step 0 of FT (1 epoch), in a subprocess."""
    logdir = tmp_path_factory.mktemp("step0")
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, "--epochs", "1", "--step", "0",
                           "--logdir", str(logdir), "--cache_dir", str(logdir / "cache")],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    return logdir, logdir / RUN


# --- item 1: exact resume under faults -----------------------------------------------------------
def test_chaos_single_process_mib_bit_identical(tmp_path):
    """MiB steps 0 and 1, killed 3 times (inside a checkpoint write, then at random moments,
    with 0 or 1 DataLoader workers): the files equal an uninterrupted run's."""
    log = []
    assert chaos.chaos(tmp_path, nproc=1, kills=3, seed=0, log=log.append) == [], "\n".join(log)
    assert sum(": exit -9" in line for line in log) >= 2, log  # the faults did strike


def test_chaos_torchrun_two_ranks_bit_identical(tmp_path):
    """2 gloo ranks under ``torchrun --max-restarts 1``: rank 0 killed inside a checkpoint write;
    torchrun restarts both ranks, which resume and finish within the same launch."""
    log = []
    assert chaos.chaos(tmp_path, nproc=2, kills=1, seed=1, log=log.append, kinds=("save",)) == [], "\n".join(log)
    assert len(log) == 2 and "fault ('save'" in log[1] and log[1].endswith("exit 0"), log


# --- item 2: a resume under other flags ---------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--epochs", "4"), ("--batch_size", "2"), ("--lr", "0.02"),
                                        ("--loss_kd", "1")])
def test_resume_with_other_schedule_flags_is_refused(interrupted, capsys, flag, value):
    args, run_dir = interrupted
    before = files(run_dir)
    assert run.main([*args, flag, value]) == 2
    one_error_line(capsys, "step-0.last.pth", f"{flag} ", "--overwrite")
    assert files(run_dir) == before


def test_overwrite_restarts_the_interrupted_step(interrupted, capsys):
    args, run_dir = interrupted
    iterations_per_epoch = checkpoint.load(run_dir / "step-0.last.pth")["trainer"]["iteration"] // 2
    assert run.main([*args, "--epochs", "2", "--overwrite"]) == 0
    assert "resuming" not in capsys.readouterr().out
    final = checkpoint.load(run_dir / "step-0.pth")
    assert final["trainer"]["iteration"] == 2 * iterations_per_epoch
    assert not (run_dir / "step-0.last.pth").exists()


# --- item 3: verified checkpoints ---------------------------------------------------------------
def test_flipped_tensor_bytes_are_refused(step0, tmp_path, capsys):
    logdir, run_dir = step0
    damaged = tmp_path / "damaged.pth"
    blob = bytearray((run_dir / "step-0.pth").read_bytes())
    weight = torch.load(run_dir / "step-0.pth", weights_only=False)["model"]["cls.0.weight"]
    at = bytes(blob).find(weight.numpy().tobytes())
    assert at > 0
    blob[at + 5] ^= 0x40
    damaged.write_bytes(bytes(blob))
    assert not torch.equal(torch.load(damaged, weights_only=False)["model"]["cls.0.weight"], weight)  # plain load
    before = files(logdir)
    assert run.main([*TINY, "--epochs", "1", "--step", "1", "--step_ckpt", str(damaged), "--logdir", str(logdir),
                     "--cache_dir", str(logdir / "cache")]) == 2
    one_error_line(capsys, str(damaged), "damaged")
    assert files(logdir) == before


def test_checkpoint_without_digest_is_refused(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="no content digest"):
        checkpoint.load(path)


def test_digest_covers_every_tensor_and_value():
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "opts": {"lr": [0.01]}}
    digest = checkpoint.content_digest(state)
    assert checkpoint.content_digest({**state, "digest": "x"}) == digest
    for changed in ({**state, "model": {"w": torch.arange(6.0).view(3, 2)}},
                    {**state, "model": {"w": torch.arange(6.0).view(2, 3).double()}},
                    {**state, "epoch": 4}, {**state, "opts": {"lr": [0.02]}}):
        assert checkpoint.content_digest(changed) != digest


def test_a_finished_step_is_reused_only_under_its_flags_and_teacher(tmp_path, capsys):
    """A rerun reuses a finished step (its scores are recomputed, not its training) only if this
    command would have trained it: before, --lr 0.02 reported the scores of an lr-0.01 step."""
    args = [*TINY, "--epochs", "1", "--shapes_train_size", "96", "--shapes_val_size", "64", "--logdir", str(tmp_path),
            "--cache_dir", str(tmp_path / "cache")]
    assert run.main([*args, "--step", "0", "1"]) == 0
    assert run.main([*args, "--step", "0", "1"]) == 0
    assert capsys.readouterr().out.count("exists, reusing it") == 2

    def weights():
        return {p: b for p, b in files(tmp_path).items() if p.suffix == ".pth"}

    before = weights()
    # step 1's lr changed, step 0's not: step 0 is reused, step 1 refused
    assert run.main([*args, "--step", "0", "1", "--lr", "0.01", "0.02"]) == 2
    one_error_line(capsys, "step-1.pth was trained with --lr 0.01, this run passes --lr 0.02", "--overwrite")
    assert weights() == before
    # step 0 retrained under another lr: step 1 was trained from the old one
    assert run.main([*args, "--step", "0", "--lr", "0.02", "0.01", "--overwrite"]) == 0
    capsys.readouterr()
    before = weights()
    assert run.main([*args, "--step", "1", "--lr", "0.02", "0.01"]) == 2
    one_error_line(capsys, "the step 0 checkpoint changed since", "step-1.pth", "--overwrite")
    assert weights() == before
    assert run.main([*args, "--step", "1", "--test"]) == 0  # evaluating what is there stays allowed


def test_evaluation_settings_change_no_weights_so_a_rerun_under_others_reuses_the_steps(tmp_path, capsys):
    """The validation set's size, crops and batch size leave every weight as it was (measured here:
    two runs differing in all three write equal tensors), so a rerun that changes them reuses
    the finished steps and tests them anew, instead of asking for --overwrite and a retraining."""
    base = [*TINY, "--epochs", "2", "--shapes_train_size", "96", "--shapes_val_size", "64",
            "--cache_dir", str(tmp_path / "cache"), "--step", "0", "1"]
    other_eval = ["--shapes_val_size", "80", "--crop_val", "--val_batch_size", "3"]
    assert run.main([*base, "--logdir", str(tmp_path / "a")]) == 0
    assert run.main([*base, *other_eval, "--logdir", str(tmp_path / "b"),
                     "--results_file", str(tmp_path / "b.jsonl")]) == 0
    for step in (0, 1):
        a, b = (checkpoint.load(tmp_path / runs / RUN / f"step-{step}.pth")["model"] for runs in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"step {step}"
    capsys.readouterr()
    results = tmp_path / "retest.jsonl"
    assert run.main([*base, *other_eval, "--logdir", str(tmp_path / "a"), "--results_file", str(results)]) == 0
    assert capsys.readouterr().out.count("exists, reusing it") == 2
    retested = [json.loads(line) for line in results.read_text().splitlines()]
    first = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["class_iou"] for r in retested] == [r["class_iou"] for r in first]  # b's scores: same weights, same tests


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "", ".", ".."])
def test_a_name_that_is_not_one_folder_is_refused(tmp_path, capsys, name):
    assert run.main([*TINY, "--name", name, "--logdir", str(tmp_path / "runs")]) == 2
    one_error_line(capsys, f"--name {name!r} must name one folder")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag,value", [("--output_stride", "8"), ("--pooling", "16")])
def test_checkpoint_of_another_architecture_is_refused(step0, capsys, flag, value):
    logdir, run_dir = step0
    before = files(logdir)
    assert run.main([*TINY, "--epochs", "1", "--step", "1", "--logdir", str(logdir), flag, value,
                     "--cache_dir", str(logdir / "cache")]) == 2
    one_error_line(capsys, "step-0.pth", f"{flag} ")
    assert files(logdir) == before


# --- item 4: labels and images validated where they are read ------------------------------------
def test_label_values_outside_the_classes_are_refused(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "voc"
    subprocess.run([sys.executable, str(ROOT / "data" / "make_shapes.py"), "--root", str(root), "--train", "12",
                    "--val", "6", "--size", "32"], check=True, capture_output=True, env=subprocess_env())
    label_path = sorted((root / "VOC2012" / "SegmentationClassAug").glob("*.png"))[2]
    label = Image.open(label_path)
    values = np.array(label)
    values[0, :3] = [30, 200, 30]
    out = Image.fromarray(values, mode="P" if label.mode == "P" else "L")
    if label.mode == "P":
        out.putpalette(label.getpalette())
    out.save(label_path)
    assert run.main([*ON_DISK, "--dataset", "voc", "--data_root", str(root), "--step", "0",
                     "--logdir", str(tmp_path / "runs")]) == 2
    one_error_line(capsys, str(label_path), "[30, 200]", "0..20 and 255")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pth"))


def test_16_bit_images_are_scaled_and_float_images_refused(tmp_path):
    from PIL import Image

    from dataset.errors import DataError
    from dataset.voc import read_image

    values = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    values[0, 0], values[0, 1] = 65535, 128  # 255, and 128 / 257 rounds to 0
    Image.fromarray(values).save(tmp_path / "grey16.png")
    rgb = read_image(tmp_path / "grey16.png")
    expected = np.rint(values / 257).astype(np.uint8)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert (rgb == expected[..., None]).all()
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match="float.tif has F pixels"):
        read_image(tmp_path / "float.tif")


# --- item 5: numeric flags, the run directory, temp files ---------------------------------------
@pytest.mark.parametrize("flag,value", [("--batch_size", "0"), ("--val_batch_size", "0"), ("--num_workers", "-1"),
                                        ("--crop_size", "0"), ("--log_interval", "0"), ("--val_interval", "0"),
                                        ("--width", "0"), ("--lr", "nan"), ("--weight_decay", "-1"),
                                        ("--shapes_seed", "-1")])
def test_numeric_flags_are_checked_at_parse_time(tmp_path, capsys, flag, value):
    assert run.main(["--dataset", "shapes", flag, value, "--logdir", str(tmp_path / "runs")]) == 2
    one_error_line(capsys, flag)
    assert not (tmp_path / "runs").exists()


def test_unwritable_run_directory_is_one_line(capsys):
    logdir = Path("/sys/cssbench-test")  # sysfs refuses new directories, even to root
    assert run.main([*TINY, "--epochs", "1", "--logdir", str(logdir)]) == 2
    one_error_line(capsys, str(logdir), "--logdir")
    assert not logdir.exists()


def test_unwritable_results_file_is_refused_before_training(tmp_path, capsys):
    """Not after step 0 has trained, when its test would first write the file, and naming the
    flag to change (the generic write error names --logdir)."""
    results = "/sys/cssbench-test/results.jsonl"
    assert run.main([*TINY, "--epochs", "1", "--logdir", str(tmp_path), "--results_file", results]) == 2
    one_error_line(capsys, f"--results_file {results}: its folder cannot be written", "choose another --results_file")
    assert not (tmp_path / RUN).exists()


def test_full_disk_during_a_checkpoint_write(tmp_path):
    """A file-size limit makes the checkpoint write fail as a full disk does (EFBIG instead of
    ENOSPC, same path): one line, no temp file, no checkpoint."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, "--epochs", "2", "--logdir", str(tmp_path),
                           "--cache_dir", str(tmp_path / "cache")], capture_output=True, text=True,
                          env=subprocess_env(), preexec_fn=limit_file_size, timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "cannot write checkpoint" in lines[0] and "step-0.last.pth" in lines[0]
    assert not list((tmp_path / RUN).glob("*.tmp")) and not list((tmp_path / RUN).glob("*.pth"))


def test_stale_temp_files_are_removed_on_the_next_start(interrupted, capsys):
    args, run_dir = interrupted
    stale = [run_dir / "step-0.last.pth.x1y2.tmp", run_dir / "results.jsonl.k3.tmp"]
    for p in stale:
        p.write_bytes(b"")
    assert run.main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert not any(p.exists() for p in stale) and not list(run_dir.glob("*.tmp"))


# --- item 6: results ----------------------------------------------------------------------------
def _strict(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_results_are_strict_json_and_a_retest_replaces_its_line(step0, capsys):
    logdir, run_dir = step0
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    first = _strict(lines[0])
    assert first["step"] == 0 and first["miou_new"] is None and first["hiou"] is None
    assert run.main([*TINY, "--epochs", "1", "--step", "0", "--logdir", str(logdir),
                     "--cache_dir", str(logdir / "cache")]) == 0
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    again = _strict(lines[0])
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}


# --- item 7: SIGINT and SIGTERM -----------------------------------------------------------------
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_stop_at_once_and_keep_the_epoch_checkpoint(tmp_path, signum, code):
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *TINY, "--epochs", "30", "--logdir", str(tmp_path),
                             "--cache_dir", str(tmp_path / "cache")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    partial = tmp_path / RUN / "step-0.last.pth"
    deadline = time.monotonic() + 300
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert signal.Signals(signum).name in lines[0] and "rerun the same command to resume" in lines[0]
    assert checkpoint.load(partial)["epoch"] >= 0  # complete and verified
    assert not (tmp_path / RUN / "step-0.pth").exists()


# --- item 8: an error on one rank of several ---------------------------------------------------
# Before: the ranks that did not fail waited in their next collective (and the failing one in the
# barrier of its cleanup) until the process group's timeout, 30 minutes by default, and a failure
# every rank saw was printed once per rank.  A process killed after LAUNCH_SECONDS counts as a hang.
LAUNCH_SECONDS = 180
QUIET = ("interrupted by", "Connection", "TCPStore", "terminate called", f'File "{ROOT}')


@pytest.fixture(scope="module")
def voc_with_a_corrupt_image(tmp_path_factory):
    """A data/make_shapes.py folder whose 4th training image is not an image: read by one rank."""
    root = tmp_path_factory.mktemp("corrupt") / "voc"
    subprocess.run([sys.executable, str(ROOT / "data" / "make_shapes.py"), "--root", str(root), "--train", "12",
                    "--val", "6", "--size", "32"], check=True, capture_output=True, env=subprocess_env())
    image = sorted((root / "VOC2012" / "JPEGImages").glob("train_*.jpg"))[3]
    image.write_bytes(b"not a JPEG")
    flags = [*ON_DISK, "--dataset", "voc", "--data_root", str(root), "--task", "offline", "--step", "0",
             "--epochs", "1", "--batch_size", "2", "--num_workers", "1"]  # offline: every image is step 0's
    return flags, image


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Exit code and output (what was piped) of each process, all killed with their children past
    LAUNCH_SECONDS."""
    deadline = time.monotonic() + LAUNCH_SECONDS
    ended = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                chaos.kill_tree(p.pid)
            pytest.fail("the ranks did not end: they wait for the one that failed")
        ended.append((proc.returncode, (out or "") + (err or "")))
    return ended


def under_torchrun(args: list[str], logdir: Path, nproc: int = 2) -> tuple[int, str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--monitor-interval=0.2", str(ROOT / "run.py"), *args, "--logdir", str(logdir),
               "--cache_dir", str(logdir / "cache")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env())
    return finish([proc])[0]


def under_env_launch(args: list[str], logdir: Path, nproc: int = 2) -> list[tuple[int, str]]:
    """Each rank started by hand with the env:// variables (as a cluster scheduler does): rank 0
    hosts the rendezvous store, so it must be the last to leave."""
    from gloo import free_port

    common = dict(subprocess_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args, "--logdir", str(logdir),
                               "--cache_dir", str(logdir / "cache")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(common, RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in range(nproc)]
    return finish(procs)


def one_error_line_of_all_ranks(output: str, *fragments) -> None:
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert not [q for q in QUIET if q in output], output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def torchrun_exit_codes(output: str) -> list[int]:
    """The exit codes of the failed ranks, from torchrun's failure report."""
    return [int(line.split(":")[1].split()[0]) for line in output.splitlines() if line.strip().startswith("exitcode")]


def test_a_corrupt_image_one_rank_reads_ends_every_rank_under_torchrun(voc_with_a_corrupt_image, tmp_path):
    flags, image = voc_with_a_corrupt_image
    code, output = under_torchrun(flags, tmp_path)
    assert code == 1 and torchrun_exit_codes(output) == [2, 2], output  # torchrun's code for a failed rank
    one_error_line_of_all_ranks(output, f"cannot read image {image}")
    assert not list(tmp_path.rglob("*.pth"))


def test_a_corrupt_image_one_rank_reads_ends_every_rank_under_an_env_launch(voc_with_a_corrupt_image, tmp_path):
    flags, image = voc_with_a_corrupt_image
    ended = under_env_launch([*flags, "--num_workers", "0"], tmp_path, nproc=3)
    assert [code for code, _ in ended] == [2, 2, 2], ended
    one_error_line_of_all_ranks("".join(out for _, out in ended), f"cannot read image {image}")


@pytest.mark.parametrize("launch", ["torchrun", "env"])
def test_a_results_file_only_rank_0_checks_ends_every_rank(tmp_path, launch):
    results = "/sys/cssbench-test/results.jsonl"
    args = [*TINY, "--epochs", "1", "--results_file", results]
    if launch == "torchrun":
        code, output = under_torchrun(args, tmp_path)
        assert code == 1 and torchrun_exit_codes(output) == [2, 2], output
    else:
        ended = under_env_launch(args, tmp_path)
        assert [code for code, _ in ended] == [2, 2], ended
        output = "".join(out for _, out in ended)
    one_error_line_of_all_ranks(output, f"--results_file {results}")
    assert not list(tmp_path.rglob("*.pth"))


@pytest.mark.parametrize("flags,fragment", [(["--step", "1"], "step 1 needs the step 0 checkpoint"),
                                            (["--bogus"], "unrecognized arguments: --bogus")])  # before the group
def test_an_error_every_rank_meets_is_printed_once(tmp_path, flags, fragment):
    code, output = under_torchrun([*TINY, *flags], tmp_path)
    assert code == 1 and torchrun_exit_codes(output) == [2, 2], output
    one_error_line_of_all_ranks(output, fragment)


def test_a_corrupt_image_a_dataloader_worker_reads_ends_the_process(voc_with_a_corrupt_image, tmp_path, capsys):
    """The worker's error reaches the main process, which then left; at exit it waited forever for
    its worker, forked with SIGTERM blocked (dataset.loaders.unblock_signals)."""
    flags, image = voc_with_a_corrupt_image
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *flags, "--logdir", str(tmp_path),
                             "--cache_dir", str(tmp_path / "cache")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    [(code, err)] = finish([proc])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"cannot read image {image}" in lines[0], err
