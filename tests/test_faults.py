"""Fault injection: crafted files, flipped bytes, kills during every temporary write, disk full,
read-only run directories, concurrent writers, missing keys, truncated JSON, users' temp files.

Every fault must end in one line ``cmtkd: error: ...`` (exit code 2, no traceback) naming the file
and the fix, leave nothing half-written behind, and never run code from a file. Disk-full and
read-only cases use a small tmpfs, which needs root (skipped otherwise); the same errors are also
injected into the write path directly, which runs everywhere.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmtkd import checkpoint
from cmtkd.checkpoint import CHECKPOINT_FILE, MODEL_FILE, read_content
from cmtkd.errors import UserError
from cmtkd.files import (LOCK_FILE, RunLock, atomic_write_bytes, is_own_temp_file, read_sealed_json,
                         write_sealed_json)
from conftest import REPO_ROOT, cli_env, run_cli, tiny_args

sys.path.insert(0, str(REPO_ROOT / "workflow" / "scripts"))
import collect_runs  # noqa: E402


# ------------------------------------------------------------------------------------- helpers
class Exploit:
    """Unpickling this creates the directory ``marker``: proof that a loader ran a file's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert the process failed with exactly one `cmtkd: error:` line on stderr; return it."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmtkd: error: "), proc.stderr
    return lines[0]


def run_here(*args: str) -> subprocess.CompletedProcess:
    """``cmtkd ARGS`` in this process (no interpreter and torch start-up: seconds per call), as run_cli reports it."""
    import contextlib
    import io

    from cmtkd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return subprocess.CompletedProcess(["cmtkd", *args], status, out.getvalue(), err.getvalue())


def own_temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if is_own_temp_file(p)]


def flip_bytes(path: Path, count: int, at: float = 0.5) -> None:
    """Invert ``count`` bytes at relative position ``at``: inside the tensor data of a .pt file
    (the payload is nearly all of it)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A small tmpfs at ``where`` (root only; skips the test where it cannot be mounted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount_read_only(where: Path) -> None:
    proc = subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {proc.stderr.strip()}")


# ----------------------------------------------------------------- 1. no code runs from a file
def _malicious_file(path: Path, marker: Path, level: str, kind: str) -> Path:
    """A file whose unpickling runs code: a plain pickle ('outer'), or a well-formed container with a
    correct hash around a malicious payload ('payload')."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if level == "outer":
        torch.save({"arch_config": Exploit(marker), "state_dict": {}}, path)
    else:
        content = {k: Exploit(marker) for k in checkpoint._KEYS[kind]}
        atomic_write_bytes(path, checkpoint.encode(kind, content))
    return path


@pytest.mark.parametrize("level", ["outer", "payload"])
@pytest.mark.parametrize("path_kind", ["kd-teacher", "frozen-teachers", "evaluate", "export", "resume"])
def test_crafted_files_run_no_code_and_fail_in_one_line(path_kind, level, reference_run, copy_run, tmp_path):
    marker = tmp_path / "pwned"
    if path_kind in ("kd-teacher", "frozen-teachers"):
        teacher = _malicious_file(tmp_path / "teacher" / MODEL_FILE, marker, level, "model")
        if path_kind == "kd-teacher":
            extra = ["--method", "kd", "--set", f"method_args.teacher={teacher.parent}"]
        else:
            extra = ["--method", "cmtkd-frozen", "--set", "method_args.teacher_bits=[8,4]",
                     "--set", f"method_args.teachers_run={teacher.parent}"]
        args = tiny_args(epochs=1)
        args[args.index("--method") + 1] = extra[1]
        proc = run_cli("train", *args, *extra[2:], "--out", str(tmp_path / "student"))
    else:
        run = copy_run(reference_run)
        if path_kind == "resume":
            _malicious_file(run / CHECKPOINT_FILE, marker, level, "checkpoint")
            proc = run_cli("train", *tiny_args(), "--out", str(run))
        else:
            _malicious_file(run / MODEL_FILE, marker, level, "model")
            proc = run_cli(path_kind, str(run), *(["--threads", "1"] if path_kind == "evaluate" else []))
    line = one_line_error(proc)
    assert not marker.exists(), "a crafted file ran code"
    assert "load safely" in line, line


def test_a_run_whose_teacher_is_missing_leaves_no_directory(tmp_path):
    """The method cannot be built (its teacher run does not exist): one-line error, and the run
    directory the command would have created does not exist afterwards (no lone config.yaml)."""
    args = tiny_args(epochs=1)
    args[args.index("--method") + 1] = "kd"
    out = tmp_path / "student"
    proc = run_cli("train", *args, "--set", f"method_args.teacher={tmp_path / 'no-such-teacher'}", "--out", str(out))
    line = one_line_error(proc)
    assert "no-such-teacher" in line, line
    assert not out.exists()


# -------------------------------------------------------------- 2. tamper-evident results
def test_flipped_bytes_in_checkpoint_tensor_data_stop_the_resume(reference_run, copy_run):
    run = copy_run(reference_run)
    flip_bytes(run / CHECKPOINT_FILE, 16)
    line = one_line_error(run_cli("train", *tiny_args(), "--out", str(run)))
    assert str(run / CHECKPOINT_FILE) in line and "SHA-256" in line and "delete it" in line


def test_flipped_bytes_in_model_tensor_data_stop_evaluate_and_export(reference_run, copy_run):
    run = copy_run(reference_run)
    (run / "eval.json").unlink(missing_ok=True)
    flip_bytes(run / MODEL_FILE, 64)
    for command in (["evaluate", str(run), "--threads", "1"], ["export", str(run)]):
        line = one_line_error(run_cli(*command))
        assert str(run / MODEL_FILE) in line and "SHA-256" in line and "rerun the same `cmtkd train`" in line
    assert not (run / "eval.json").exists() and not (run / "student.pt2").exists()
    assert not own_temp_files(run)


@pytest.mark.parametrize("damage", ["flipped", "deleted"])
def test_complete_run_with_a_bad_model_rebuilds_it(damage, reference_run, copy_run):
    run = copy_run(reference_run)
    if damage == "flipped":
        flip_bytes(run / MODEL_FILE, 64)
    else:
        (run / MODEL_FILE).unlink()
    proc = run_cli("train", *tiny_args(), "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "already complete" not in proc.stdout and "rebuilding" in proc.stdout
    assert (run / MODEL_FILE).read_bytes() == (reference_run / MODEL_FILE).read_bytes()
    assert read_sealed_json(run / "metrics.json", "")["top1"] == json.loads(
        (reference_run / "metrics.json").read_text())["top1"]


def test_truncated_metrics_of_a_complete_run_are_rebuilt(reference_run, copy_run):
    run = copy_run(reference_run)
    text = (run / "metrics.json").read_text()
    (run / "metrics.json").write_text(text[: len(text) // 2])
    proc = run_cli("train", *tiny_args(), "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "metrics.json" in proc.stdout and "rebuilding" in proc.stdout
    assert read_sealed_json(run / "metrics.json", "")["top1"] == json.loads(text)["top1"]


def _grid_row(run: Path) -> dict:
    row = {k: "x" for k in collect_runs.KEY}
    row.update(run_dir=str(run), role="grid")
    return row


@pytest.mark.parametrize("name", ["eval.json", "metrics.json"])
@pytest.mark.parametrize("damage", ["edited", "truncated", "unsealed"])
def test_collect_runs_refuses_damaged_results(name, damage, reference_run, copy_run):
    run = copy_run(reference_run)
    if not (run / "eval.json").exists():
        write_sealed_json(run / "eval.json", {"top1": 35.3, "top5": 80.0, "n": 1000, "split": "test"})
    record, _ = collect_runs.read_run(_grid_row(run))  # intact: collected
    path = run / name
    text = path.read_text()
    if damage == "edited":
        obj = json.loads(text)
        obj["top1"] = obj["top1"] + 1.0
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    else:
        obj = json.loads(text)
        del obj["sha256"]
        path.write_text(json.dumps(obj))
    with pytest.raises(UserError) as info:
        collect_runs.read_run(_grid_row(run))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert ("cmtkd evaluate" if name == "eval.json" else "cmtkd train") in message


def test_old_format_files_fail_in_one_line(reference_run, copy_run):
    run = copy_run(reference_run)
    blob = read_content(run / MODEL_FILE)
    torch.save(blob, run / MODEL_FILE)  # what cmtkd 0.1 wrote: no container, no hash
    line = one_line_error(run_cli("evaluate", str(run), "--threads", "1"))
    assert "older cmtkd" in line and str(run / MODEL_FILE) in line


# ----------------------------------------------------------------------- 3. one line per fault
def test_checkpoint_missing_keys_is_one_line(reference_run, copy_run):
    run = copy_run(reference_run)
    content = read_content(run / CHECKPOINT_FILE)
    del content["config"], content["rng"]
    atomic_write_bytes(run / CHECKPOINT_FILE, checkpoint.encode("checkpoint", content))
    line = one_line_error(run_cli("train", *tiny_args(), "--out", str(run)))
    assert str(run / CHECKPOINT_FILE) in line and "config" in line and "rng" in line


@pytest.mark.parametrize("key,value,says", [
    ("epoch", "1", "epoch is not a count"), ("config", "x", "config is not a mapping"),
    ("history", "junk", "history is not one row per epoch"), ("best", [1], "best is not a mapping"),
    ("rng", {"x": 1}, "rng is not the random states"), ("train_seconds", "7", "a counter is not a number"),
    ("method", {"junk.weight": torch.zeros(1)}, "does not fit this run")])
def test_checkpoint_with_verified_hash_but_wrong_content_is_one_line(key, value, says, reference_run, copy_run):
    """A checkpoint whose SHA-256 verifies (a broken writer, or crafted) but whose content the trainer cannot
    resume from: one line naming it, not a TypeError/AttributeError/state-dict traceback."""
    run = copy_run(reference_run)
    content = read_content(run / CHECKPOINT_FILE)
    content.update(epoch=content["epoch"] - 1, history=content["history"][:-1])  # mid-run: it resumes
    content[key] = value
    atomic_write_bytes(run / CHECKPOINT_FILE, checkpoint.encode("checkpoint", content))
    (run / "metrics.json").unlink()
    line = one_line_error(run_here("train", *tiny_args(), "--out", str(run)))
    assert str(run / CHECKPOINT_FILE) in line and says in line and "delete it" in line


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_failed_atomic_write_is_one_line_and_leaves_no_temp(code, tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old\n")

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(UserError) as info:
        atomic_write_bytes(target, b"new\n")
    message = str(info.value)
    assert str(target) in message and "\n" not in message and "nothing partial" in message
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_disk_full_during_training_is_one_line_and_leaves_nothing_partial(tmp_path):
    with tmpfs(tmp_path / "small", "1m") as disk:  # config.yaml fits, a ~2 MB checkpoint does not
        out = disk / "run"
        line = one_line_error(run_cli("train", *tiny_args(epochs=1), "--out", str(out)))
        assert "no space left on device" in line and CHECKPOINT_FILE in line
        assert not out.exists()  # the directory it created, removed again (no checkpoint, no temp file in it)


def test_disk_full_during_export_is_one_line_and_leaves_nothing_partial(reference_run, tmp_path):
    with tmpfs(tmp_path / "tiny", "64k") as disk:  # a ResNet-18 program (~0.5 MB) does not fit
        out = disk / "student.pt2"
        line = one_line_error(run_cli("export", str(reference_run), "--out", str(out)))
        assert "no space left on device" in line and str(out) in line
        assert list(disk.iterdir()) == []
    assert not own_temp_files(reference_run)


def test_read_only_run_directory_is_one_line(reference_run, tmp_path):
    with tmpfs(tmp_path / "ro", "16m") as disk:
        run = disk / "run"
        shutil.copytree(reference_run, run)
        (run / "eval.json").unlink(missing_ok=True)
        remount_read_only(disk)
        line = one_line_error(run_cli("evaluate", str(run), "--threads", "1"))
        assert "read-only file system" in line and "eval.json" in line
        line = one_line_error(run_cli("train", *tiny_args(), "--out", str(run)))
        assert str(run) in line
        assert not (run / "eval.json").exists() and not own_temp_files(run)


def test_a_second_writer_is_refused_in_one_line(reference_run, copy_run):
    run = copy_run(reference_run)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from cmtkd.files import RunLock; lock = RunLock(sys.argv[1], 'cmtkd train').acquire(); "
        "print('locked', flush=True); time.sleep(120)"), str(run)],
        cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK_FILE}
        for command in (["train", *tiny_args(), "--out", str(run)], ["evaluate", str(run), "--threads", "1"]):
            line = one_line_error(run_cli(*command))
            assert f"in use by another cmtkd train (pid {holder.pid})" in line, line
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK_FILE} == before
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: the run is usable again
    proc = run_cli("train", *tiny_args(), "--out", str(run))
    assert proc.returncode == 0 and "already complete" in proc.stdout, proc.stderr


def test_lock_is_per_directory_and_reentrant_after_release(tmp_path):
    a = RunLock(tmp_path).acquire()
    with pytest.raises(UserError, match="in use by another"):
        RunLock(tmp_path).acquire()
    a.release()
    RunLock(tmp_path).acquire().release()


def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path):
    """A planted ``.cmtkd.lock -> victim`` must not make cmtkd truncate and write the victim."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).symlink_to(victim)
    line = one_line_error(run_cli("train", *tiny_args(), "--out", str(run)))
    assert "is a symbolic link" in line and str(run / LOCK_FILE) in line
    assert victim.read_text() == "precious\n" and [p.name for p in run.iterdir()] == [LOCK_FILE]
    with pytest.raises(UserError, match="symbolic link"):
        RunLock(run).acquire()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_a_model_file_that_is_not_a_regular_file_is_one_line_without_reading_it(kind, reference_run, copy_run):
    """A FIFO would block evaluate for ever and a link to /dev/zero would fill memory: refused before reading."""
    run = copy_run(reference_run)
    (run / "eval.json").unlink(missing_ok=True)
    (run / MODEL_FILE).unlink()
    if kind == "fifo":
        os.mkfifo(run / MODEL_FILE)
    elif kind == "dev-zero":
        (run / MODEL_FILE).symlink_to("/dev/zero")
    else:
        (run / MODEL_FILE).mkdir()
    proc = subprocess.run([sys.executable, "-m", "cmtkd", "evaluate", str(run), "--threads", "1"], cwd=REPO_ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    line = one_line_error(proc)
    assert str(run / MODEL_FILE) in line and "rerun the same `cmtkd train`" in line
    assert not (run / "eval.json").exists()


def test_a_model_file_of_another_configuration_is_refused_and_rebuilt(reference_run, copy_run):
    """A verified model.pt copied in from another run (here: the same file re-sealed with another config hash)
    would be evaluated as this run's: evaluate and load_run refuse it in one line, and rerunning the run's
    command rebuilds it from the checkpoint, byte for byte."""
    import cmtkd

    run = copy_run(reference_run)
    (run / "eval.json").unlink(missing_ok=True)
    original = (run / MODEL_FILE).read_bytes()
    content = read_content(run / MODEL_FILE)
    atomic_write_bytes(run / MODEL_FILE, checkpoint.encode("model", {**content, "config_hash": "0" * 16}))
    line = one_line_error(run_here("evaluate", str(run), "--threads", "1"))
    assert "was written for another configuration than" in line and not (run / "eval.json").exists()
    with pytest.raises(UserError, match="another configuration"):
        cmtkd.load_run(run)
    proc = run_here("train", *tiny_args(), "--out", str(run))
    assert proc.returncode == 0 and "written for another configuration" in proc.stdout, proc.stderr
    assert (run / MODEL_FILE).read_bytes() == original


def test_a_run_written_before_some_config_keys_existed_still_evaluates(reference_run, copy_run):
    """An older cmtkd hashed config.yaml as it wrote it, without keys added since (model.init_from,
    model.quant_layout, ...): evaluate and load_run accept its model.pt (today's defaults fill those keys)."""
    import cmtkd
    import yaml

    from cmtkd.config import config_hash

    run = copy_run(reference_run)
    (run / "eval.json").unlink(missing_ok=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["model"]["init_from"], config["train"]["tf32"]
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    content = read_content(run / MODEL_FILE)
    atomic_write_bytes(run / MODEL_FILE, checkpoint.encode("model", {**content, "config_hash": config_hash(config)}))
    assert run_here("evaluate", str(run), "--threads", "1").returncode == 0
    assert cmtkd.load_run(run).metrics is not None


@pytest.mark.parametrize("damage", ["edited-config", "garbage-history", "truncated-history"])
def test_a_complete_run_with_an_edited_config_or_history_is_rebuilt(damage, reference_run, copy_run):
    """config.yaml must be the run's configuration (evaluate checks model.pt against it) and history.csv one row
    per epoch: rerunning the run's command rebuilds either instead of calling the run complete."""
    run = copy_run(reference_run)
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "history.csv")}
    if damage == "edited-config":
        text = before["config.yaml"].decode()
        assert "  image_size: null\n" in text
        (run / "config.yaml").write_text(text.replace("  image_size: null\n", "  image_size: 14\n"))
        assert "another configuration" in one_line_error(run_here("evaluate", str(run), "--threads", "1"))
    elif damage == "garbage-history":
        (run / "history.csv").write_bytes(b"\xff\xfe garbage")
    else:
        (run / "history.csv").write_bytes(before["history.csv"].rsplit(b"\n", 2)[0] + b"\n")
    proc = run_here("train", *tiny_args(), "--out", str(run))
    assert proc.returncode == 0 and "rebuilding the results from the final checkpoint" in proc.stdout, proc.stderr
    assert {name: (run / name).read_bytes() for name in before} == before
    assert run_here("evaluate", str(run), "--threads", "1").returncode == 0


def test_load_run_checks_the_seal_of_metrics_and_reads_history_in_one_error(reference_run, copy_run):
    import json

    import cmtkd

    run = copy_run(reference_run)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "top1": 99.9}))  # edited, seal unchanged
    with pytest.raises(UserError, match="metrics.json"):
        cmtkd.load_run(run)
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert cmtkd.load_run(run).metrics["top1"] == metrics["top1"]
    (run / "history.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="history.csv"):
        cmtkd.load_run(run)


@pytest.mark.parametrize("threads", [1, 7, None])
def test_resuming_with_another_thread_count_says_the_result_will_differ(threads, reference_run, copy_run):
    """CPU sums split by thread: a resume with another torch thread count than the checkpoint's is not bit for
    bit the uninterrupted run, and says so (the thread count is not part of the config hash). A checkpoint
    from before the key (None: absent) resumes without the note."""
    run = copy_run(reference_run)
    content = read_content(run / CHECKPOINT_FILE)
    assert content["threads"] == 1  # tiny_args train with one thread
    content.update(epoch=content["epoch"] - 1, history=content["history"][:-1], threads=threads)
    if threads is None:
        del content["threads"]
    atomic_write_bytes(run / CHECKPOINT_FILE, checkpoint.encode("checkpoint", content))
    (run / "metrics.json").unlink()
    proc = run_here("train", *tiny_args(), "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "resuming after epoch" in proc.stdout
    note = f"the checkpoint was written with {threads} torch thread(s), this process has 1"
    differs = threads not in (1, None)
    assert (note in proc.stdout) is differs and ("torch thread(s)" in proc.stdout) is differs


@pytest.mark.parametrize("width", [1e6, float("inf"), float("nan"), 8.0])
def test_a_model_file_describing_a_huge_or_impossible_network_is_refused_before_allocating(width, reference_run,
                                                                                           copy_run):
    """A well-formed model.pt (valid SHA-256) may still describe any network: it is sized on the meta device
    first, so a width of 1e6 is one error instead of gigabytes allocated."""
    import cmtkd

    run = copy_run(reference_run)
    content = read_content(run / MODEL_FILE)
    content["arch_config"] = {**content["arch_config"], "width": width}
    atomic_write_bytes(run / MODEL_FILE, checkpoint.encode("model", content))
    says = "weights do not fit its own arch_config" if width == 8.0 else "has an arch_config this version cannot build"
    with pytest.raises(UserError, match=says) as error:  # 8: 0.7 G parameters, checked on the meta device
        cmtkd.load_student(run)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------ 4. only our own temp files
def test_cleanup_removes_only_our_own_temp_files(tmp_path):
    user_dir = tmp_path / "notes"  # an existing directory that is not a run directory
    user_dir.mkdir()
    (user_dir / ".notes.tmp").write_text("my notes")
    (user_dir / ".x.k1ll3d.tmp").write_text("someone else's temp")
    stale = user_dir / ".checkpoint.pt.cmtkd-k1ll3d00.tmp"
    stale.write_bytes(b"half a checkpoint")
    args = tiny_args(epochs=1)
    args[args.index("data.batch_size=256")] = "data.batch_size=4000"  # more than digits has: fails after the directory is set up
    line = one_line_error(run_cli("train", *args, "--out", str(user_dir)))
    assert "fewer than data.batch_size" in line
    assert (user_dir / ".notes.tmp").read_text() == "my notes"
    assert (user_dir / ".x.k1ll3d.tmp").exists()
    assert not stale.exists()


# ---------------------------------------------------------- 6. kills during every temporary write
KILL_AT_REPLACE = """
import os, signal, sys
target, nth = sys.argv[1], int(sys.argv[2])
real_replace, seen = os.replace, [0]
def replace(src, dst):
    if os.path.basename(dst) == target:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)  # the temp file is written and synced, not yet renamed
    return real_replace(src, dst)
os.replace = replace
from cmtkd.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "run"
    proc = run_cli("train", *tiny_args(epochs=2), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("evaluate", str(out), "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("target, nth", [("config.yaml", 1), (CHECKPOINT_FILE, 1), (CHECKPOINT_FILE, 2),
                                         ("history.csv", 2), (MODEL_FILE, 1), ("metrics.json", 1),
                                         ("eval.json", 1)])
def test_kill_during_any_temporary_write_then_rerun_gives_the_same_result(target, nth, two_epoch_run, tmp_path):
    out = tmp_path / "run"
    train = ["train", *tiny_args(epochs=2), "--out", str(out)]
    if target == "eval.json":
        shutil.copytree(two_epoch_run, out)
        (out / "eval.json").unlink()
        command = ["evaluate", str(out), "--threads", "1"]
    else:
        command = train
    killed = subprocess.run([sys.executable, "-c", KILL_AT_REPLACE, target, str(nth), *command], cwd=REPO_ROOT,
                            env=cli_env(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert any(p.name.startswith(f".{target}.cmtkd-") for p in own_temp_files(out)), "not killed mid-write"
    if nth == 1:
        assert not (out / target).exists()  # never half a file
    proc = run_cli(*command)
    assert proc.returncode == 0, proc.stderr
    assert not own_temp_files(out)
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        a, b = read_content(out / name), read_content(two_epoch_run / name)
        states = ("state_dict",) if name == MODEL_FILE else ("method",)
        for key in states:
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    ours = read_sealed_json(out / ("eval.json" if target == "eval.json" else "metrics.json"), "")
    ref = read_sealed_json(two_epoch_run / ("eval.json" if target == "eval.json" else "metrics.json"), "")
    assert ours["top1"] == ref["top1"] and ours["top5"] == ref["top5"]
    assert (out / "history.csv").read_text().count("\n") == (two_epoch_run / "history.csv").read_text().count("\n")


def test_a_lock_file_that_is_a_hard_link_is_refused_and_the_other_file_untouched(tmp_path):
    victim = tmp_path / "model-of-another-run.pt"
    victim.write_bytes(b"weights")
    run = tmp_path / "run"
    run.mkdir()
    os.link(victim, run / LOCK_FILE)
    with pytest.raises(UserError, match="not a plain file of its own"):
        RunLock(run).acquire()
    assert victim.read_bytes() == b"weights"


def test_a_sparse_huge_model_file_is_one_line_without_reading_it(reference_run, copy_run):
    import cmtkd

    run = copy_run(reference_run)
    with open(run / MODEL_FILE, "r+b") as fh:
        fh.truncate(64 * 2**30)  # sparse: no disk used, 64 GiB to read
    with pytest.raises(UserError, match="more than any file cmtkd writes"):
        cmtkd.load_student(run)


def test_a_history_that_is_not_a_regular_file_is_one_line(reference_run, copy_run):
    import cmtkd

    run = copy_run(reference_run)
    (run / "history.csv").unlink()
    os.mkfifo(run / "history.csv")
    with pytest.raises(UserError, match="history.csv"):
        cmtkd.load_run(run)
