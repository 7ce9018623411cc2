"""Publish a finished suite's results into the repository, with a machine-made fingerprint.

    publish_results.py SUITE_DIR --configfile config/reference.yaml [--out results/reference]
                       [--wall-seconds S]
    make reference-publish        (runs/reference -> results/reference)

SUITE_DIR is the suite's working directory (``snakemake --directory SUITE_DIR``). Copied: its
``results/runs.csv``, ``results/tables/*.{csv,md}`` and ``results/plots/*.png``; nothing else (no
checkpoint, model or log). Written next to them: ``FINGERPRINT.json`` and ``ENVIRONMENT.md`` (the
same facts for people):

- the suite: each config layer (config/config.yaml, then each --configfile) with its SHA-256, the
  resolved config, and the command line and cores of each Snakemake invocation that its logs under
  ``SUITE_DIR/.snakemake/log`` record (ENVIRONMENT.md quotes those commands; where no log records one,
  it rebuilds the command from this script's arguments, with the cores from the logs' "Provided
  cores" or, when no log has them either, ``--cores N`` and a note that they were not recorded);
- the code: the git commit every run recorded (with ``-dirty`` when its tree had uncommitted changes)
  and how many runs each, and the commit of this checkout at publishing;
- the runs: how many (grid runs and teacher runs), torch and Python of the runs, threads per job
  (from each run's sealed ``metrics.json``), total training time (sum of ``train_seconds``: with one
  thread per job about the CPU-seconds of training, on cores nothing else used), wall time of the
  suite (sum of the elapsed times of its Snakemake invocations, from ``SUITE_DIR/.snakemake/log``, or
  ``--wall-seconds``);
- the machine publishing (assumed the one that ran the suite): CPU model, cores, platform, and the
  versions of Python, torch, snakemake, numpy, pandas and scipy;
- the SHA-256 of every published file.

Refused (one line ``cmtkd: error: ...``, nothing written): a run the config asks for that the suite
has not finished (named), runs the config does not ask for (the suite was made with another config),
no tables or plots yet. The new folder is assembled next to the old one and swapped in by renames, so
an interruption leaves the old results or the new ones, never a mix.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import sys
import tempfile
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402
import suite_config  # noqa: E402
from script_io import error, read_csv  # noqa: E402

from cmtkd.engine.env import cpu_model, git_commit  # noqa: E402  (the runs' own fingerprint code; imports torch)
from cmtkd.errors import UserError  # noqa: E402
from cmtkd.files import atomic_write_json, atomic_write_text, read_sealed_json, sha256_file  # noqa: E402

ROOT = suite_config.ROOT
COPIED = (("tables", "*.csv"), ("tables", "*.md"), ("plots", "*.png"))  # and runs.csv: text and pictures only
VERSIONS = ("torch", "snakemake", "numpy", "pandas", "scipy")
LOG_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{6}\.\d+)\.snakemake\.log$")
ELAPSED = re.compile(r"^Elapsed time: (?:(\d+) days?, )?(\d+):(\d+):(\d+(?:\.\d+)?)", re.M)
STARTED = re.compile(r"^\s*Date: (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})", re.M)
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d{2}:\d{2}:\d{2} \d{4})\]", re.M)
COMMAND = re.compile(r"^\s*Command: (.+)$", re.M)  # Snakemake's header: its program and arguments
CORES = re.compile(r"^Provided cores: (\d+)", re.M)
UNKNOWN_CORES = "--cores N"  # in the command rebuilt from this script's arguments
SHOWN_MISSING = 5
UMASK = os.umask(0o022)
os.umask(UMASK)


# ------------------------------------------------------------------------------ the suite's runs
def expected_runs(configfiles: list[str]) -> tuple[dict, pd.DataFrame]:
    """The resolved suite config and its runs (grid.expand), as the workflow builds them."""
    try:
        config, _ = suite_config.load_suite(configfiles)
        return config, grid.expand(config)
    except (suite_config.SuiteConfigError, grid.GridError) as exc:
        raise UserError(str(exc)) from None


def run_key(frame: pd.DataFrame) -> pd.Series:
    return frame[list(grid.COLUMNS)].astype(str).agg("/".join, axis=1)


def check_complete(runs: pd.DataFrame, expected: pd.DataFrame, runs_csv: Path) -> None:
    """Every run of the config is in runs.csv with a top-1, and nothing else is."""
    have = set(run_key(runs[runs["top1"].notna()]))
    want = run_key(expected)
    missing = [key for key in want if key not in have]
    if missing:
        shown = "; ".join(missing[:SHOWN_MISSING]) + (f"; ... ({len(missing) - SHOWN_MISSING} more)"
                                                      if len(missing) > SHOWN_MISSING else "")
        raise UserError(f"{runs_csv}: {len(missing)} of {len(want)} runs of the config are not finished "
                        f"(method/dataset/arch/w_bits/a_bits/teacher_bits/seed: {shown}); finish the suite "
                        f"(snakemake ... --rerun-incomplete) and publish again")
    extra = sorted(have - set(want))
    if extra:
        raise UserError(f"{runs_csv} has {len(extra)} run(s) the config does not ask for, e.g. {extra[0]}: the "
                        f"suite was made with another config; publish it with the --configfile it was run with")


def read_suite(suite: Path, configfiles: list[str]) -> tuple[dict, pd.DataFrame]:
    runs_csv = suite / "results" / "runs.csv"
    if not runs_csv.is_file():
        raise UserError(f"{runs_csv} does not exist; run the suite to the end first "
                        f"(snakemake --configfile ... --directory {suite})")
    runs = read_csv(runs_csv, columns=[*grid.COLUMNS, "top1", "role", "train_seconds", "run_dir"],
                    numbers=["top1", "train_seconds"], fix="rebuild it with `snakemake tables`",
                    dtype={"teacher_bits": str}, keep_default_na=False, na_values=[""])
    config, expected = expected_runs(configfiles)
    check_complete(runs, expected, runs_csv)
    return config, runs


def published_files(suite: Path) -> list[tuple[Path, Path]]:
    """(source, path inside the published folder) of every file to copy."""
    results = suite / "results"
    files = [(results / "runs.csv", Path("runs.csv"))]
    for folder, pattern in COPIED:
        found = sorted((results / folder).glob(pattern))
        if not found:
            raise UserError(f"{results / folder} has no {pattern}; the suite has not finished (run it to the end, "
                            f"or `snakemake tables` in {suite})")
        files += [(path, Path(folder) / path.name) for path in found]
    return files


# ---------------------------------------------------------------------------------- the fingerprint
def run_environments(suite: Path, runs: pd.DataFrame) -> list[dict]:
    """The ``env`` of each run's sealed metrics.json (Python, threads), where the file is there."""
    envs = []
    for run_dir in runs["run_dir"]:
        path = suite / run_dir / "metrics.json"
        if path.is_file():
            envs.append(read_sealed_json(path, f"rerun the run (snakemake {run_dir}/metrics.json)").get("env", {}))
    return envs


def log_seconds(log: Path) -> float | None:
    """Elapsed seconds of one Snakemake invocation from its log (None: nothing ran)."""
    text = log.read_text(errors="replace")
    elapsed = ELAPSED.search(text)
    if elapsed:
        days, h, m, s = elapsed.groups()
        return int(days or 0) * 86400 + int(h) * 3600 + int(m) * 60 + float(s)
    stamps = STAMP.findall(text)
    if not stamps:
        return None
    started = STARTED.search(text)
    named = LOG_NAME.match(log.name)
    start = (datetime.strptime(started.group(1), "%Y-%m-%d %H:%M:%S") if started
             else datetime.strptime(named.group(1), "%Y-%m-%dT%H%M%S.%f") if named else None)
    end = datetime.strptime(" ".join(stamps[-1].split()), "%a %b %d %H:%M:%S %Y")
    return None if start is None else max(0.0, (end - start).total_seconds())


def wall_time(suite: Path, given: float | None) -> dict:
    if given is not None:
        return {"seconds": given, "source": "--wall-seconds"}
    logs = sorted((suite / ".snakemake" / "log").glob("*.snakemake.log"))
    seconds = [s for s in map(log_seconds, logs) if s is not None]
    if not seconds:
        return {"seconds": None, "source": f"unknown: no Snakemake log in {suite / '.snakemake' / 'log'} "
                                           f"(give --wall-seconds)"}
    return {"seconds": round(sum(seconds), 1),
            "source": f"sum of the elapsed times of {len(seconds)} Snakemake invocation(s) in .snakemake/log"}


def snakemake_program(command: str) -> str:
    """A recorded command line with its program (``.../snakemake/__main__.py``, ``.../bin/snakemake``)
    shown as ``snakemake``."""
    program, _, args = command.strip().partition(" ")
    path = Path(program)
    if path.name == "snakemake" or (path.name == "__main__.py" and path.parent.name == "snakemake"):
        program = "snakemake"
    return f"{program} {args}".strip()


def invocations(suite: Path) -> list[dict]:
    """Each Snakemake invocation of the suite (dry runs write no log), oldest first, with the command
    line and the cores its log records (None where it does not; logs that record neither are left out)."""
    found = []
    for log in sorted((suite / ".snakemake" / "log").glob("*.snakemake.log")):
        text = log.read_text(errors="replace")
        command, cores = COMMAND.search(text), CORES.search(text)
        if command or cores:
            found.append({"log": log.name, "command": snakemake_program(command.group(1)) if command else None,
                          "cores": int(cores.group(1)) if cores else None})
    return found


def command_text(recorded: list[dict], rebuilt: str) -> str:
    """The ENVIRONMENT.md line of the command(s) that made the suite: the recorded ones, else ``rebuilt``
    (this script's arguments, ``--cores N``) with the recorded cores, else ``rebuilt`` and a note."""
    commands = list(dict.fromkeys(i["command"] for i in recorded if i["command"]))
    if commands:
        return (f"Command{'s' if len(commands) > 1 else ''} (from the suite's Snakemake logs, oldest first): "
                + "; ".join(f"`{c}`" for c in commands))
    cores = list(dict.fromkeys(i["cores"] for i in recorded if i["cores"] is not None))
    if cores:
        return ("Command: " + "; ".join(f"`{rebuilt.replace(UNKNOWN_CORES, f'--cores {c}', 1)}`" for c in cores)
                + " (cores from the suite's Snakemake logs, which do not record the command line)")
    return (f"Command: `{rebuilt}` (N: the cores used were not recorded; no Snakemake log of the suite "
            f"says, in .snakemake/log)")


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def shown_path(path: str | Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def distinct(values) -> list:
    return sorted({v for v in values if v is not None and not (isinstance(v, float) and pd.isna(v))}, key=str)


def fingerprint(suite: Path, configfiles: list[str], config: dict, runs: pd.DataFrame, wall: dict) -> dict:
    envs = run_environments(suite, runs)
    commits = runs["git_commit"].fillna("unknown").value_counts().sort_index() if "git_commit" in runs else None
    layers = [suite_config.DEFAULT_SUITE, *(f for f in configfiles  # the default suite itself: one layer
                                            if Path(f).resolve() != Path(suite_config.DEFAULT_SUITE).resolve())]
    return {
        "suite": {"config_layers": [{"file": shown_path(p), "sha256": sha256_file(p)} for p in layers],
                  "resolved_config": config, "invocations": invocations(suite)},
        "code": {"run_commits": {} if commits is None else {str(k): int(v) for k, v in commits.items()},
                 "any_run_dirty": None if commits is None else any(str(c).endswith("-dirty") for c in commits.index),
                 "commit_at_publishing": git_commit()},
        "runs": {"total": len(runs), "grid": int((runs["role"] == "grid").sum()),
                 "teacher": int((runs["role"] == "teacher").sum()),
                 "variant": int((runs["role"] == "variant").sum()),  # levels of a sensitivity study (vary)
                 "torch": distinct(runs.get("torch", [])), "python": distinct(e.get("python") for e in envs),
                 "threads_per_job": distinct(e.get("threads") for e in envs),
                 "devices": distinct(runs.get("device_name", [])),
                 "train_seconds_total": round(float(runs["train_seconds"].sum()), 1),
                 "train_seconds_note": "sum of the runs' training wall times; with 1 thread per job about their "
                                       "CPU-seconds, if no other work shared the cores"},
        "wall_time": wall,
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), **{p: version(p) for p in VERSIONS}},
    }


def environment_md(print_: dict, command: str) -> str:
    """FINGERPRINT.json for people; ``command``: the suite's command rebuilt from this script's arguments
    (with ``--cores N``), quoted where the Snakemake logs record no command line."""
    runs, code, wall, machine = print_["runs"], print_["code"], print_["wall_time"], print_["machine"]
    seconds = wall["seconds"]
    wall_text = "unknown" if seconds is None else f"{seconds:,.0f} s ({seconds / 60:.1f} min)"
    layers = ", ".join(f"`{layer['file']}` (sha256 {layer['sha256'][:12]})"
                       for layer in print_["suite"]["config_layers"])
    commits = ", ".join(f"{c[:12]}{' (dirty)' if c.endswith('-dirty') else ''}: {n} runs"
                        for c, n in code["run_commits"].items())
    lines = [
        "# How these files were produced",
        "",
        "Machine-made by `workflow/scripts/publish_results.py` (all of it is in `FINGERPRINT.json`).",
        "",
        f"- {command_text(print_['suite'].get('invocations', []), command)}",
        f"- Config layers: {layers}; the resolved config is in `FINGERPRINT.json`.",
        f"- Code: the runs recorded {commits or 'no commit'}; any uncommitted changes: "
        f"{'yes' if code['any_run_dirty'] else 'no' if code['any_run_dirty'] is False else 'unknown'}; "
        f"checkout at publishing: {code['commit_at_publishing'] or 'unknown'}.",
        f"- Runs: {runs['total']} ({runs['grid']} grid runs, {runs['teacher']} teacher runs"
        f"{f', {v} variant runs' if (v := runs.get('variant')) else ''}); torch "
        f"{', '.join(runs['torch']) or 'unknown'}, Python {', '.join(runs['python']) or 'unknown'}, "
        f"threads per job {', '.join(map(str, runs['threads_per_job'])) or 'unknown'}.",
        f"- Wall time: {wall_text} ({wall['source']}).",
        f"- Training time: {runs['train_seconds_total']:,.0f} s summed over the runs ({runs['train_seconds_note']}).",
        f"- Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, {machine['platform']}; Python "
        f"{machine['python']}, " + ", ".join(f"{p} {machine[p]}" for p in VERSIONS) + ".",
        "- Copied: `runs.csv`, `tables/*.{csv,md}`, `plots/*.png` (no checkpoints; `snakemake tables` rebuilds "
        "the LaTeX tables and PDF plots from `runs.csv`).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- publishing
def assemble(staging: Path, files: list[tuple[Path, Path]], print_: dict, command: str) -> None:
    for source, target in files:
        (staging / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staging / target)
    print_["files"] = {str(target): sha256_file(staging / target) for _, target in files}
    atomic_write_json(staging / "FINGERPRINT.json", print_)
    atomic_write_text(staging / "ENVIRONMENT.md", environment_md(print_, command))


def swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` with renames: the old folder moves aside first and comes back if
    the second rename fails, so ``out`` holds the old results or the new ones, never a mix."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def publish(suite: Path, configfiles: list[str], out: Path, wall_seconds: float | None, command: str) -> dict:
    config, runs = read_suite(suite, configfiles)
    files = published_files(suite)
    print_ = fingerprint(suite, configfiles, config, runs, wall_time(suite, wall_seconds))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        staging.chmod(0o777 & ~UMASK)  # mkdtemp makes it 0700; a results folder gets a plain mkdir's mode
        assemble(staging, files, print_, command)
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return print_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("suite", help="the suite's working directory (snakemake --directory)")
    parser.add_argument("--configfile", action="append", required=True,
                        help="the suite's config file(s), as given to snakemake (layered over config/config.yaml)")
    parser.add_argument("--out", default=str(ROOT / "results" / "reference"), help="folder to publish into "
                                                                                    "(default %(default)s)")
    parser.add_argument("--wall-seconds", type=float, help="the suite's wall time (default: from its Snakemake logs)")
    args = parser.parse_args(argv)
    suite = Path(args.suite)
    command = f"snakemake {UNKNOWN_CORES} " + " ".join(f"--configfile {shown_path(c)}" for c in args.configfile) + \
        f" --directory {args.suite}"
    try:
        print_ = publish(suite, args.configfile, Path(args.out), args.wall_seconds, command)
    except (UserError, OSError) as exc:
        return error(exc)
    runs = print_["runs"]
    print(f"{args.out}: {len(print_['files'])} files and FINGERPRINT.json, ENVIRONMENT.md from {runs['total']} runs "
          f"({runs['train_seconds_total']:,.0f} training seconds, wall {print_['wall_time']['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
