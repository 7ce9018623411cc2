"""Hardening II, item 6: how `cmtkd` stops and what it leaves behind.

1. SIGTERM and SIGHUP stop a command like Ctrl-C does: one line naming the signal, exit status 128+signum,
   the run directory resumable (lock released, no temp file, nothing half-written).
2. `cmtkd evaluate` / `cmtkd export` of a run another process is still training say so in one line.
3. A run that fails before its first checkpoint leaves its directory as it found it: no config.yaml added
   to a directory that existed, and a directory it created (e.g. on a full disk) removed again.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmtkd.checkpoint import CHECKPOINT_FILE, MODEL_FILE, read_content
from cmtkd.files import LOCK_FILE, RunLock, read_sealed_json
from conftest import REPO_ROOT, cli_env, run_cli, start_cli, tiny_args
from test_faults import one_line_error, own_temp_files, run_here, tmpfs

RESUME = "rerun the same command to resume from the last finished epoch"


# ------------------------------------------------------------------- 1. SIGTERM and SIGHUP
def _wait_for(proc: subprocess.Popen, path: Path, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"run exited (rc {proc.returncode}) before writing {path.name}:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {path.name} after {seconds} s")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_training_in_one_line_and_the_rerun_resumes(signum, reference_run, tmp_path):
    out = tmp_path / "stopped"
    args = ["train", *tiny_args(), "--out", str(out)]
    proc = start_cli(*args)
    try:
        _wait_for(proc, out / CHECKPOINT_FILE)  # epoch 1 finished; the run is in epoch 2 of 3
        finished = (out / "metrics.json").exists()
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not finished, "the run finished before it could be stopped"
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, (proc.returncode, stderr)
    assert stderr.strip().splitlines() == [f"cmtkd: stopped by {name}; {RESUME}"], stderr
    # left as after Ctrl-C: lock released, no temp file, no result, a checkpoint to resume from
    assert not (out / LOCK_FILE).exists() and not own_temp_files(out)
    assert not (out / "metrics.json").exists() and not (out / MODEL_FILE).exists()
    assert read_content(out / CHECKPOINT_FILE)["epoch"] < 3

    resumed = run_cli(*args, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout
    ours, ref = read_content(out / MODEL_FILE), read_content(reference_run / MODEL_FILE)
    assert ours["selected_epoch"] == ref["selected_epoch"]
    assert all(torch.equal(ours["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])
    a, b = read_sealed_json(out / "metrics.json", ""), read_sealed_json(reference_run / "metrics.json", "")
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])
    assert (out / "history.csv").read_text().count("\n") == 4


@pytest.fixture
def fallback_handlers():
    """Handlers that only record SIGTERM/SIGHUP, so a signal cmtkd does not handle cannot kill pytest;
    restored afterwards."""
    seen = []
    record = lambda signum, frame: seen.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, record) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield seen, record
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("command,says", [(["train"], RESUME),
                                          (["evaluate", "RUN"], "nothing was written; rerun the command"),
                                          (["export", "RUN"], "nothing was written; rerun the command")])
def test_a_stop_signal_says_what_a_rerun_does_and_restores_the_handlers(command, says, signum, monkeypatch, capsys,
                                                                         fallback_handlers):
    import cmtkd.cli as cli

    seen, record = fallback_handlers

    def stopped(args):
        os.kill(os.getpid(), signum)
        time.sleep(10)  # the handler raises long before this ends
        return 0

    monkeypatch.setattr(cli, f"cmd_{command[0]}", stopped)
    started = time.monotonic()
    status = cli.main(command)
    assert time.monotonic() - started < 5 and not seen, "the signal reached the previous handler"
    assert status == 128 + signum
    err = capsys.readouterr().err
    assert err == f"cmtkd: stopped by {signal.Signals(signum).name}; {says}\n"
    assert signal.getsignal(signal.SIGTERM) is record and signal.getsignal(signal.SIGHUP) is record


def test_an_ignored_sighup_stays_ignored(monkeypatch, capsys):
    """Under `nohup cmtkd train ...` SIGHUP is ignored, and must stay so."""
    import cmtkd.cli as cli

    def hung_up(args):
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.2)
        return 0

    monkeypatch.setattr(cli, "cmd_train", hung_up)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert cli.main(["train"]) == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------- 2. evaluate/export of a run in training
@pytest.fixture
def training_holder():
    """``training_holder(run_dir)`` -> a process holding RUN_DIR's lock as `cmtkd train` does; killed afterwards."""
    procs = []

    def _hold(run: Path) -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sys, time; from cmtkd.files import RunLock; RunLock(sys.argv[1], 'cmtkd train').acquire(); "
            "print('locked', flush=True); time.sleep(120)"), str(run)],
            cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE, text=True)
        procs.append(holder)
        assert holder.stdout.readline().strip() == "locked"
        return holder

    yield _hold
    for holder in procs:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_evaluate_or_export_of_a_run_still_in_training_says_so(command, reference_run, copy_run, training_holder):
    run = copy_run(reference_run)
    for name in (MODEL_FILE, "metrics.json", "eval.json"):  # not written yet while it trains
        (run / name).unlink(missing_ok=True)
    holder = training_holder(run)
    before = sorted(p.name for p in run.iterdir())
    line = one_line_error(run_here(command, str(run), *(["--threads", "1"] if command == "evaluate" else [])))
    assert f"{run} is in use by another cmtkd train (pid {holder.pid}), which is still training it" in line, line
    assert "wait for it to finish, then rerun" in line and "does not exist" not in line, line
    assert sorted(p.name for p in run.iterdir()) == before


def test_evaluating_a_finished_run_leaves_no_lock_and_does_not_block_training(reference_run, copy_run):
    run = copy_run(reference_run)
    proc = run_here("evaluate", str(run), "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert not (run / LOCK_FILE).exists()
    RunLock(run, "cmtkd train").acquire().release()  # nothing holds it afterwards


# ------------------------------------------------- 3. a failed run leaves its directory as it was
def _kd_without_teacher(tmp_path: Path) -> list[str]:
    args = tiny_args(epochs=1)
    args[args.index("--method") + 1] = "kd"
    return [*args, "--set", f"method_args.teacher={tmp_path / 'no-such-teacher'}"]


FAILURES = {
    "teacher missing": (_kd_without_teacher, "no-such-teacher"),
    "data missing": (lambda tmp_path: [*tiny_args(epochs=1, dataset="cifar100"),
                                       "--data-root", str(tmp_path / "no-such-data")], "no-such-data"),
    "batch larger than the data": (lambda tmp_path: [*tiny_args(epochs=1), "--set", "data.batch_size=4000"],
                                   "fewer than data.batch_size"),
}


@pytest.mark.parametrize("contents", [{}, {"notes.txt": "mine\n"}], ids=["empty", "with a user's file"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_run_failing_before_its_first_epoch_leaves_an_existing_directory_as_it_was(failure, contents, tmp_path):
    make_args, says = FAILURES[failure]
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in contents.items():
        (out / name).write_text(text)
    line = one_line_error(run_here("train", *make_args(tmp_path), "--out", str(out)))
    assert says in line, line
    assert {p.name: p.read_text() for p in out.iterdir()} == contents


def test_a_fresh_run_on_a_full_disk_removes_the_directory_it_created(tmp_path):
    with tmpfs(tmp_path / "small", "1m") as disk:  # config.yaml fits, a ~2 MB checkpoint does not
        mine = disk / "mine"
        mine.mkdir()
        (mine / "notes.txt").write_text("mine\n")
        for out in (disk / "runs" / "new", mine):
            line = one_line_error(run_cli("train", *tiny_args(epochs=1), "--out", str(out)))
            assert "no space left on device" in line and CHECKPOINT_FILE in line, line
        assert not (disk / "runs" / "new").exists()
        assert (disk / "runs").is_dir()  # the parent it made stays: only the run directory itself is removed
        assert {p.name: p.read_text() for p in mine.iterdir()} == {"notes.txt": "mine\n"}
