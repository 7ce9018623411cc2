"""Hardening II: config files read strictly everywhere, sizes bounded before allocation, tables that
compile with any Unicode. Where the failure was a hang or an allocation, the test bounds its own time
and memory (a subprocess with a timeout and an address-space limit)."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cmtkd.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import checks  # noqa: E402
import suite_config  # noqa: E402
from test_workflow import SNAKEFILE, SNAKEMAKE, fixture_workdir, run_script, tiny_config  # noqa: E402,F401
from test_workflow_inputs import argv_maker, output_of, run_key  # noqa: E402


def bounded(code: str, timeout: float = 120, headroom_gib: float = 1.5) -> subprocess.CompletedProcess:
    """Run ``code`` (Python) in a subprocess that may grow its address space by at most ``headroom_gib``
    beyond what its imports took (set by the code itself after the imports, via ``LIMIT()``)."""
    prelude = textwrap.dedent(f"""
        import re, resource
        def LIMIT():
            size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
            limit = size + int({headroom_gib} * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# ----------------------------------------------------------------- 1. one strict config reader
def alias_bomb(path: Path) -> Path:
    """9 anchors x 9 aliases: 80 lines that expand to 9^9 (387 million) strings."""
    lines = ["recipe:", "  epochs: 1", "bomb:", "  a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path.write_text("\n".join(lines) + "\n")
    return path


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


BAD_CONFIGS = {
    "alias bomb": (alias_bomb, "anchors and aliases"),
    "repeated key": (lambda p: p.write_text("recipe:\n  epochs: 1\nrecipe:\n  epochs: 2\n") and p,
                     "key 'recipe' appears twice in one mapping (line 3)"),
    "not UTF-8": (lambda p: p.write_bytes(b"recipe:\n  epochs: 1\n# caf\xe9\n") and p,
                  "is not UTF-8 text (byte 0xe9 on line 3)"),
    "sparse terabyte": (lambda p: sparse(p, 2**40), "more than a config file can be"),
    "invalid YAML": (lambda p: p.write_text("recipe: {epochs: 1\n") and p, "is not valid YAML (line 2:"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_the_workflow_reads_a_suite_config_as_strictly_as_the_library(case, tmp_path):
    """In a subprocess bounded in time and memory: before, the alias bomb hung the workflow's reader at
    100 % CPU while its memory grew, and the sparse terabyte was read whole."""
    make, says = BAD_CONFIGS[case]
    path = make(tmp_path / "mine.yaml")
    done = bounded(f"""
        import sys
        sys.path.insert(0, {str(SCRIPTS)!r})
        import suite_config, yaml, jsonschema, snakemake.utils
        from cmtkd.config import load_yaml
        from cmtkd.errors import UserError
        LIMIT()
        for read in (lambda: suite_config.load_suite([{str(path)!r}]), lambda: load_yaml({str(path)!r})):
            try:
                read()
            except (suite_config.SuiteConfigError, UserError) as exc:
                print(exc)
    """, timeout=60, headroom_gib=1.0)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(says in line and str(path) in line for line in lines), done.stdout


def test_a_config_override_with_an_alias_is_refused():
    with pytest.raises(suite_config.SuiteConfigError, match="--config recipe: YAML anchors"):
        suite_config.load_suite([], ["recipe=&a {epochs: 1}"])


def test_an_alias_bomb_stops_snakemake_in_one_line_instead_of_hanging(tmp_path):
    """Before: `snakemake -n` expanded the bomb in the schema error's pretty-printer (100 % CPU, 7.6 GB
    after 10 minutes). Snakemake itself loads the file first (it shares the aliases, cheaply); the
    workflow's own reader refuses it."""
    import resource

    limit = 8 * 2**30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    path = alias_bomb(tmp_path / "bomb.yaml")
    done = subprocess.run([*SNAKEMAKE, "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path), "--cores", "1",
                           "-n", "--configfile", str(path)], capture_output=True, text=True, timeout=180,
                          preexec_fn=cap)
    assert done.returncode != 0
    assert "anchors and aliases (&name, *name) are not supported (line 4)" in output_of(done), output_of(done)[-2000:]


# ----------------------------------------------------- 2. sizes bounded before allocation
def test_a_huge_network_is_refused_before_the_run_directory_exists(tmp_path):
    out = tmp_path / "run"
    done = bounded(f"""
        import sys
        import torch._subclasses.fake_tensor, cmtkd.engine.trainer, cmtkd.methods  # imports take address space
        from cmtkd.cli import main, train_config
        train_config([])  # every lazy import of resolving a config
        LIMIT()
        sys.exit(main(["train", "--epochs", "1", "--threads", "1", "--set", "model.width=1e6", "--out", {str(out)!r}]))
    """, headroom_gib=1.0)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "too large for torch to size" in done.stderr, done.stderr
    assert not out.exists()


def test_a_network_over_the_cap_names_the_estimate_the_cap_and_the_key_that_raises_it(tmp_path):
    from cmtkd.cli import train_config
    from cmtkd.engine.footprint import check_network_size

    cfg = train_config(["--set", "model.width=8"])  # ResNet-18 at 8x width: 0.7 G parameters
    with pytest.raises(UserError, match=r"needs about 1\d\d GiB .* more than train.max_network_gib=64") as error:
        check_network_size(cfg)
    assert "\n" not in str(error.value)
    raised = train_config(["--set", "model.width=8", "--set", "train.max_network_gib=1000"])
    assert 64 < check_network_size(raised).gib < 1000
    from cmtkd.config import config_hash

    plain = train_config([])
    assert config_hash(train_config(["--set", "train.max_network_gib=1000"])) == config_hash(plain)  # not a result key
    assert check_network_size(plain).gib < 5  # cmtkd train's default: ResNet-18 at width 1 on digits, batch 128


@pytest.mark.parametrize("width", ["1e12", "8"])
def test_the_pre_start_check_applies_the_size_bound_to_every_run(width):
    config = tiny_config(methods=["qat"], seeds=[0])
    config["recipe"].setdefault("model", {})["width"] = float(width)
    config = suite_config.check_suite(config, "huge")
    problems = checks.cmtkd_problems(config, [run_key("qat", tset="none")], argv_maker(config))
    says = "too large for torch to size" if width == "1e12" else "more than train.max_network_gib"
    assert len(problems) == 1 and says in problems[0] and "recipe" in problems[0], problems


def test_the_nominal_dataset_shapes_match_the_loaders():
    from cmtkd.data import cifar100, digits, imagenet
    from cmtkd.data.common import NOMINAL

    assert NOMINAL["digits"][:3] == (digits.NUM_CLASSES, 1, digits.IMAGE_SIZE)
    assert NOMINAL["cifar100"][:3] == (cifar100.NUM_CLASSES, 3, cifar100.IMAGE_SIZE)
    assert NOMINAL["imagenet"][2] == imagenet.TRAIN_CROP


def memo_bomb(path: Path) -> Path:
    """A valid CIFAR-100-shaped pickle of about 12 KB whose labels are 1000 references to a list of 1000
    references to a list of 1000 labels: 10^9 labels once copied."""
    labels = [1] * 1000
    nested = [[labels] * 1000] * 1000
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "fine_labels": nested}, protocol=2))
    assert path.stat().st_size < 16_000
    return path


def test_a_cifar_file_that_expands_by_memo_references_is_refused_within_its_own_size(tmp_path):
    path = memo_bomb(tmp_path / "train")
    done = bounded(f"""
        import time
        from pathlib import Path
        from cmtkd.data.cifar100 import load_pickle_split
        from cmtkd.errors import UserError
        LIMIT()
        started = time.monotonic()
        try:
            load_pickle_split(Path({str(path)!r}))
        except UserError as exc:
            print(f"{{time.monotonic() - started:.1f}}", exc)
    """, timeout=120, headroom_gib=0.5)
    assert done.returncode == 0, done.stderr[-2000:]
    seconds, message = done.stdout.split(" ", 1)
    assert "expands beyond the file's own size" in message and float(seconds) < 5, done.stdout


@pytest.mark.parametrize("name", ["model.pt", "metrics.json", "history.csv"])
def test_a_sparse_file_under_the_read_cap_is_refused_without_reading_it(name, tmp_path):
    """A 3 GiB sparse model.pt took 3.7 GB and 15 s to reach its refusal; the blocks on disk tell first."""
    from cmtkd.files import read_regular_file

    path = sparse(tmp_path / name, 3 * 2**30)
    started = time.monotonic()
    with pytest.raises(OSError, match="a sparse file"):
        read_regular_file(path)
    assert time.monotonic() - started < 1


def test_a_sparse_model_file_of_a_run_is_one_line(reference_run, copy_run):
    import cmtkd

    run = copy_run(reference_run)
    sparse(run / "model.pt", 3 * 2**30)
    with pytest.raises(UserError, match="a sparse file") as error:
        cmtkd.load_student(run)
    assert "\n" not in str(error.value)


def test_a_written_file_is_not_sparse(tmp_path):
    from cmtkd.files import atomic_write_bytes, read_regular_file

    data = os.urandom(1024) * (80 * 1024)  # 80 MiB, over the size from which sparseness is checked
    atomic_write_bytes(tmp_path / "big", data)
    assert read_regular_file(tmp_path / "big") == data


# ----------------------------------------------------------------- 4. LaTeX and Unicode
UNICODE_SOURCES = ["≤ 2 bits", "∞ epochs", "中文论文 (2023)", "emoji 🚀 table", "Müller & Søren, naïve café",
                   "Ångström ﬁne-tuned", "Δ θ α ≈ ≠ −1 — –", "zero\u200bwidth", "x² ½"]


def test_every_non_ascii_character_becomes_ascii_latex():
    from make_tables import tex_escape

    for text in UNICODE_SOURCES:
        out = tex_escape(text)
        assert out.isascii(), (text, out)
    assert tex_escape("≤ ∞") == r"$\leq$ $\infty$"
    assert tex_escape("Müller naïve") == r'M\"{u}ller na\"{\i{}}ve'
    assert tex_escape("中") == r"\texttt{[U+4E2D]}"
    assert tex_escape("ﬁ x²") == "fi x2"


def test_tables_with_any_unicode_source_are_ascii_latex_that_compiles(fixture_workdir):
    """Imported results whose `source` holds ordinary Unicode: every .tex table is ASCII (so pdflatex
    needs no package beyond booktabs) with balanced braces and math; compiled with pdflatex where it
    is installed."""
    work = fixture_workdir
    rows = ["method,dataset,arch,w_bits,a_bits,seed,top1,source"]
    rows += [f'lq-nets,cifar100,alexnet,2,2,{i},{60 + i / 10:.1f},"{text}"' for i, text in enumerate(UNICODE_SOURCES)]
    (work / "results" / "external" / "unicode.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    run_script("collect_runs.py", "--grid", "results/runs/grid.csv", "--out", "results/runs.csv",
               "--histories", "results/runs/histories.csv", "--finished-only", cwd=work)
    run_script("make_tables.py", "--runs", "results/runs.csv", "--grid", "results/runs/grid.csv",
               "--paper", str(ROOT / "results" / "paper" / "reported.csv"),
               "--external", "results/external/unicode.csv", "--out-dir", "results/tables", cwd=work)
    tables = sorted((work / "results" / "tables").glob("*.tex"))
    assert len(tables) >= 5
    for table in tables:
        text = table.read_text(encoding="utf-8")
        assert text.isascii(), (table, [c for c in text if not c.isascii()][:5])
        body = text.replace(r"\{", "").replace(r"\}", "").replace(r"\$", "")
        assert body.count("{") == body.count("}") and body.count("$") % 2 == 0, table
    main = (work / "results" / "tables" / "main.tex").read_text()
    assert r"$\leq$ 2 bits" in main and r"\texttt{[U+4E2D]}" in main, main
    if shutil.which("pdflatex") is None:
        return
    for table in tables:
        document = work / f"doc-{table.stem}.tex"
        document.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                            f"\\input{{{table}}}\n\\end{{document}}\n")
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name],
                              cwd=work, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:]
