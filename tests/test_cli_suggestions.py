"""The CLI's rough edges (issue 26.4): no abbreviated flags, "did you mean" for unknown flags, methods and
keys, a method without options says so, list-valued keys show their syntax, a suite config given to
`cmtkd train` is recognised and the right command named."""
from __future__ import annotations

from pathlib import Path

import pytest

from cmtkd.cli import main

ROOT = Path(__file__).resolve().parents[1]


def error_of(capsys, *argv: str) -> str:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    return err.splitlines()[-1]


@pytest.mark.parametrize("argv, says", [
    (["train", "--mehtod", "qat"], "cmtkd train: error: unrecognized arguments: --mehtod qat (did you mean '--method'?)"),
    (["train", "--epoch", "2", "--print-config"], "unrecognized arguments: --epoch 2 (did you mean '--epochs'?)"),
    (["evaluate", "runs/x", "--thread", "2"], "cmtkd evaluate: error: unrecognized arguments: --thread 2 (did you mean "
                                              "'--threads'?)"),
])
def test_an_unknown_or_abbreviated_flag_is_named_by_its_subcommand_with_the_closest_flag(capsys, argv, says):
    """Before: `--epoch 2` was taken as --epochs, and `train --mehtod` printed the top-level usage."""
    assert says in error_of(capsys, *argv)


def test_an_unknown_method_suggests_the_closest(capsys):
    assert "unknown method 'qt' (did you mean 'qat'?)" in error_of(capsys, "train", "--method", "qt", "--print-config")


def test_an_unknown_key_suggests_the_closest(capsys):
    line = error_of(capsys, "train", "--method", "cmtkd", "--set", "method_args.temprature=2", "--print-config")
    assert "unknown config key 'method_args.temprature' (did you mean 'temperature'?)" in line
    line = error_of(capsys, "train", "--set", "optim.lrr=0.1", "--print-config")
    assert "(did you mean 'lr'?)" in line


def test_a_method_without_options_says_so(capsys):
    line = error_of(capsys, "train", "--method", "qat", "--set", "method_args.temperature=2", "--print-config")
    assert "this method has no options" in line and "valid keys here: " not in line


def test_a_list_valued_key_shows_its_syntax(capsys):
    line = error_of(capsys, "train", "--method", "cmtkd", "--set", "method_args.teacher_bits=8,6,4", "--print-config")
    assert "expects a list, got '8,6,4'; write it in brackets, e.g. --set method_args.teacher_bits=[8,6,4]" in line


def test_a_suite_config_given_to_train_names_the_workflow_command(capsys):
    suite = ROOT / "config" / "config.yaml"
    line = error_of(capsys, "train", "--config", str(suite), "--print-config")
    assert "is a suite config for the workflow" in line and f"snakemake --cores 2 --configfile {suite}" in line
