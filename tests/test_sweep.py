"""sweep.py: every combination as ordinary train.py runs, named by loss, rate and seed; a second
invocation trains nothing; --index runs one; bad input to any point is refused before the first run;
--summary groups the runs that differ only in seed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import cli
import rundir
import sweep
from conftest import ROOT, TINY, saved_at_step

ONE_EPOCH = [*TINY, "--epochs", "1"]


def swept(data_dir, logdir, *flags):
    return sweep.main([*ONE_EPOCH, "--data", str(data_dir), "--logdir", str(logdir), *flags])


def listing(logdir):
    return sorted(path.relative_to(logdir) for path in logdir.rglob("*"))


# Slow (20-45 s on two cores): kept out of the default suite's 6 minutes.
@pytest.mark.slow
def test_index_trains_one_run_and_a_second_time_nothing(small_isbi_dir, tmp_path, capsys):
    logdir = tmp_path / "logs"
    seeds = ["--loss", "bce", "--lr", "1e-3", "--seed", "0", "1"]
    assert swept(small_isbi_dir, logdir, *seeds, "--index", "1", "--parallel", "2") == 0
    assert capsys.readouterr().out.splitlines() == [
        f"sweep.py: run 1/1: bce_lr1e-3_seed1 (new): python train.py {' '.join(ONE_EPOCH)} --data {small_isbi_dir} "
        f"--logdir {logdir} --loss bce --lr 1e-3 --seed 1 --name bce_lr1e-3_seed1",
        f"sweep.py: 1 of 1 runs trained; compare them: python train.py --summary {logdir}",
    ]
    config = rundir.read_config(logdir / "bce_lr1e-3_seed1")
    assert (config["loss"], config["lr"], config["seed"]) == ("bce", 1e-3, 1)
    assert rundir.checkpoint_step(logdir / "bce_lr1e-3_seed1" / rundir.LAST) == 3
    assert "best validation V_rand" in (logdir / "bce_lr1e-3_seed1.out").read_text()  # its output, with --parallel

    before = {path: path.stat().st_mtime_ns for path in logdir.rglob("*")}
    assert swept(small_isbi_dir, logdir, *seeds, "--list") == 0
    new, finished = capsys.readouterr().out.splitlines()
    assert new.startswith("0  bce_lr1e-3_seed0  new  python train.py ") and finished == "1  bce_lr1e-3_seed1  finished"
    assert swept(small_isbi_dir, logdir, *seeds, "--index", "1") == 0
    assert capsys.readouterr().out.splitlines() == [
        "sweep.py: bce_lr1e-3_seed1: finished",
        f"sweep.py: all 1 runs have finished; compare them: python train.py --summary {logdir}",
    ]
    assert {path: path.stat().st_mtime_ns for path in logdir.rglob("*")} == before


def test_list_says_which_runs_are_new_finished_or_to_resume_and_trains_nothing(
    two_run_logdir, isbi_dir, tmp_path, capsys
):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    shutil.copytree(two_run_logdir / "bce_lr1e-3", logdir / "bce_lr1e-3_seed0")  # 2 epochs of TINY, seed 0
    before = listing(logdir)
    flags = [*TINY, "--data", str(isbi_dir), "--logdir", str(logdir), "--lr", "1e-3", "--seed", "0", "1", "--list"]
    assert sweep.main(flags) == 0
    assert sweep.main([*flags, "--epochs", "3"]) == 0
    finished, new, resumed, still_new = capsys.readouterr().out.splitlines()
    assert finished == "0  bce_lr1e-3_seed0  finished"
    assert new.startswith("1  bce_lr1e-3_seed1  new  python train.py --filters 4 ") and new.endswith(
        "--loss bce --lr 1e-3 --seed 1 --name bce_lr1e-3_seed1"
    )
    assert resumed == f"0  bce_lr1e-3_seed0  resume  python train.py --resume {logdir / 'bce_lr1e-3_seed0'} --epochs 3"
    assert still_new.startswith("1  bce_lr1e-3_seed1  new  ")
    assert listing(logdir) == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--name", "mine"], "sweep.py names and resumes its runs itself: drop --name"),
        (["--resume", "logs/x"], "sweep.py names and resumes its runs itself: drop --resume"),
        (
            ["--profile-batch=2,3"],
            "sweep.py profiles no run: profile one of its settings with train.py --profile-batch",
        ),
        (["--crop", "128"], "was trained with crop 64, not as this sweep asks: give the sweep another --logdir"),
        (["--index", "2"], "--index 2: this sweep has 2 runs, 0 to 1"),
        (["--images", "missing.tif", "--labels", "missing.tif"], "missing.tif"),  # the data, as train.py checks it
    ],
)
def test_bad_input_to_any_run_is_refused_before_the_first_starts(
    flags, message, two_run_logdir, isbi_dir, tmp_path, capsys
):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    shutil.copytree(two_run_logdir / "bce_lr1e-3", logdir / "bce_lr1e-3_seed0")  # TINY's crop 64
    before = listing(logdir)
    arguments = [*TINY, "--data", str(isbi_dir), "--logdir", str(logdir), "--lr", "1e-3", "--seed", "0", "1", *flags]
    assert sweep.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("sweep.py: error: ") and message in error and error.count("\n") == 1, error
    assert listing(logdir) == before


def test_each_parallel_run_gets_a_gpu_of_its_own_or_its_share_of_the_cpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert [environment["CUDA_VISIBLE_DEVICES"] for environment in sweep.environments(2)] == ["0", "1"]
    assert [environment["CUDA_VISIBLE_DEVICES"] for environment in sweep.environments(1)] == ["0,1"]  # all, alone
    with pytest.raises(cli.InputError, match="--parallel 3 but 2 GPUs: give --parallel 2 or less"):
        sweep.environments(3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: set(range(8)))
    (first, second) = sweep.environments(2)
    assert first["TF_NUM_INTRAOP_THREADS"] == second["OMP_NUM_THREADS"] == "4"


def test_a_stop_ends_every_run_and_names_those_it_stopped_apart_from_those_that_failed():
    sleeping = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    failing.wait()  # failed on its own before the stop
    running = {(sleeping, None): (SimpleNamespace(name="a"), {}), (failing, None): (SimpleNamespace(name="b"), {})}
    assert sweep.stop_runs(running) == (["a"], ["b"])
    assert sleeping.returncode == -signal.SIGTERM


def test_a_run_that_another_process_trains_or_that_holds_no_config_is_left_alone(
    two_run_logdir, isbi_dir, tmp_path, capsys
):
    logdir = tmp_path / "logs"
    shutil.copytree(two_run_logdir / "bce_lr1e-3", logdir / "bce_lr1e-3_seed0")
    (logdir / "bce_lr1e-3_seed1").mkdir()  # as another sweep's task leaves it for a moment
    nested = logdir / "bce_lr1e-3_seed2" / "dice_lr1e-3"  # a run started inside one that was then removed
    nested.mkdir(parents=True)
    (nested / rundir.CONFIG).write_text("{}")
    arguments = [*TINY, "--data", str(isbi_dir), "--logdir", str(logdir), "--lr", "1e-3", "--seed", "0", "1", "2"]
    with rundir.locked(logdir / "bce_lr1e-3_seed0"):
        assert sweep.main([*arguments, "--epochs", "3"]) == 0
    trained, empty, holding, summary = capsys.readouterr().out.splitlines()
    assert trained.startswith(
        f"sweep.py: bce_lr1e-3_seed0: left alone: {logdir / 'bce_lr1e-3_seed0'} is being trained by "
    )
    assert empty == (
        f"sweep.py: bce_lr1e-3_seed1: left alone: {logdir / 'bce_lr1e-3_seed1'} holds no config.json: "
        "remove it to start it anew"
    )
    assert holding == (
        f"sweep.py: bce_lr1e-3_seed2: left alone: {logdir / 'bce_lr1e-3_seed2'} holds no config.json: "
        f"move {nested} out of it, then remove it to start it anew"
    )
    assert summary.startswith("sweep.py: 0 of 3 runs have finished; compare them: ")


def test_a_finished_run_whose_promotion_a_kill_cut_is_put_right_and_skipped(two_run_logdir, isbi_dir, tmp_path, capsys):
    run_dir = tmp_path / "logs" / "bce_lr1e-3_seed0"
    shutil.copytree(two_run_logdir / "bce_lr1e-3", run_dir)
    shutil.copyfile(run_dir / rundir.LAST, run_dir / ".best.4242.partial.keras")  # killed before its rename
    saved_at_step(run_dir / rundir.BEST, 3)
    arguments = [
        *TINY,
        "--data",
        str(isbi_dir),
        "--logdir",
        str(tmp_path / "logs"),
        "--lr",
        "1e-3",
        "--eval-every",
        "1",
    ]
    assert sweep.main(arguments) == 0
    assert capsys.readouterr().out.splitlines() == [
        "sweep.py: bce_lr1e-3_seed0: finished",
        f"sweep.py: {rundir.best_promoted(run_dir, 1)}",
        f"sweep.py: all 1 runs have finished; compare them: python train.py --summary {tmp_path / 'logs'}",
    ]
    assert (run_dir / rundir.BEST).read_bytes() == (run_dir / rundir.LAST).read_bytes()


# Slow: a training stopped by a real signal, as tests/test_cli.py's for train.py.
@pytest.mark.slow
def test_sigterm_stops_the_runs_of_a_sweep_that_ignores_sigint_and_keeps_their_checkpoints(small_isbi_dir, tmp_path):
    logdir = tmp_path / "logs"
    run_dir = logdir / "bce_lr1e-4_seed0"
    process = subprocess.Popen(
        [sys.executable, "sweep.py", *TINY, "--epochs", "50", "--data", str(small_isbi_dir), "--logdir", str(logdir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # As a script's background job starts it (a cluster's job script, say): SIGINT ignored,
        # and ignored in its runs too.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    deadline = time.monotonic() + 240
    while not (run_dir / rundir.LAST).is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert output.endswith(
        f"\ntrain.py: stopped by SIGTERM: continue the run from its last checkpoint with --resume {run_dir}\n"
        "sweep.py: stopped by SIGTERM: bce_lr1e-4_seed0 stopped as after Ctrl-C, checkpoints kept: run the same "
        "sweep again to go on\n"
    ), output[-600:]
    rundir.refuse_if_being_trained(run_dir)  # its train.py has ended: the lock is free
    assert (run_dir / rundir.LAST).is_file()


def test_a_run_there_trained_on_other_data_is_refused_not_counted_as_finished(
    two_run_logdir, isbi_dir, tmp_path, capsys
):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    run_dir = logdir / "bce_lr1e-3_seed0"
    shutil.copytree(two_run_logdir / "bce_lr1e-3", run_dir)  # 2 epochs of TINY on ISBI, seed 0
    config = json.loads((run_dir / rundir.CONFIG).read_text())
    config["data_files"]["labels_sha256"] = "0" * 64  # trained on other labels than the sweep's
    (run_dir / rundir.CONFIG).write_text(json.dumps(config))
    before = listing(logdir)
    assert sweep.main([*TINY, "--data", str(isbi_dir), "--logdir", str(logdir), "--lr", "1e-3", "--list"]) == 2
    assert capsys.readouterr().err == (
        f"sweep.py: error: {run_dir} was trained on other data ({config['data_files']['labels']}) than this sweep's: "
        "give the sweep another --logdir\n"
    )
    assert listing(logdir) == before
