"""results/report.html: ``snakemake --report`` for the same workflow, config files and overrides.

The workflow calls ``write_report_if_outdated`` after a successful run (workflow/rules/report.smk);
by hand, ``snakemake --report results/report.html`` with the same ``--configfile``/``--config``
does the same. The report's front page is workflow/report/workflow.rst: the suite's
``description`` appears there as a literal block, i.e. as plain text (no reST markup, directives
or HTML of a config reach the page).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path


def report_command(snakefile: str | Path, workdir: str | Path, report_html: str, configfiles: Iterable = (),
                   config_args: Iterable[str] = (), replace_workflow_config: bool = False) -> list[str]:
    """The ``snakemake --report`` command line of this workflow invocation."""
    args = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
            "--report", report_html]
    for path in configfiles:
        args += ["--configfile", str(path)]
    if replace_workflow_config:
        args.append("--replace-workflow-config")
    config_args = [str(a) for a in config_args]
    if config_args:
        args += ["--config", *config_args]
    return args


def report_outdated(enabled: bool, outputs: Iterable[str | Path], report_html: str | Path) -> bool:
    """Whether the report is on, every output it shows exists, and one of them is newer than it."""
    outputs = [Path(p) for p in outputs]
    if not enabled or not outputs or not all(p.exists() for p in outputs):
        return False
    html = Path(report_html)
    return not html.exists() or html.stat().st_mtime < max(p.stat().st_mtime for p in outputs)


def write_report(command: list[str], log_path: str | Path, report_html: str) -> bool:
    """Run ``command`` with its output in ``log_path``; say where the report (or the log) is."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    print(f"Report: {report_html}" if done.returncode == 0 else
          f"Writing {report_html} failed; see {log_path}", file=sys.stderr)
    return done.returncode == 0


def write_report_if_outdated(workflow, config: dict, outputs: Iterable[str], report_html: str, log_path: str) -> None:
    """Snakemake's onsuccess: rebuild the report after a run that changed what it shows."""
    if report_outdated(bool(config.get("report", True)), outputs, report_html):
        from suite_config import invocation

        configfiles, config_args, replace = invocation(workflow)
        write_report(report_command(workflow.main_snakefile, os.getcwd(), report_html, configfiles, config_args,
                                    replace), log_path, report_html)
