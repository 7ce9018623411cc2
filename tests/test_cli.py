"""The command line: every user mistake is one ``cmtkd: error:`` line and exit status 2 (never a
traceback), help texts mention the key options, ``list`` and ``--print-config`` work."""
from __future__ import annotations

import json

import pytest
import yaml

from cmtkd.cli import main

QAT = ["--method", "qat", "--arch", "resnet18", "--dataset", "digits", "--w-bits", "2", "--a-bits", "2",
       "--threads", "1"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("cmtkd: error:")]


def assert_user_error(capsys, argv: list[str], *needles: str) -> str:
    """``main(argv)`` exits 2 with exactly one error line that contains every needle; returns it."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = error_lines(captured.err)
    assert len(lines) == 1 and [x for x in captured.err.splitlines() if x.strip()] == lines, captured.err  # only it
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("flags,needles", [
    (["--method", "magic"], ["unknown method 'magic'", "qat"]),
    (["--arch", "vgg16"], ["unknown arch 'vgg16'", "resnet18"]),
    (["--dataset", "mnist"], ["unknown dataset 'mnist'", "digits"]),
    (["--set", "model.weight_quant=ternary"], ["unknown weight quantizer 'ternary'"]),
    (["--set", "model.act_quant=relu6"], ["unknown activation quantizer 'relu6'"]),
    (["--set", "model.policy=half"], ["unknown quantization policy 'half'", "fp-first-last"]),
    (["--set", "model.variant=tiny"], ["model.variant", "cifar"]),
    (["--set", "optim.lrr=1"], ["unknown config key 'optim.lrr'", "lr"]),
    (["--set", "epochs=abc"], ["'epochs'", "int", "abc"]),
    (["--set", "optim.lr=fast"], ["'optim.lr'", "float"]),
    (["--set", "model.width=0"], ["model.width"]),
    (["--epochs", "0"], ["epochs"]),
    (["--set", "nonsense"], ["key=value"]),
    (["--set", "method_args.temperature=4"], ["unknown config key 'method_args.temperature'"]),
    (["--w-bits", "1", "--set", "model.weight_quant=binary", "--set", "model.policy=8bit-first-last"],
     ["binary", "8"]),
])
def test_bad_settings_fail_before_anything_is_written(capsys, tmp_path, flags, needles):
    out = tmp_path / "run"
    assert_user_error(capsys, ["train", *QAT, *flags, "--out", str(out)], *needles)
    assert not out.exists()


# Numbers the optimizer, the model builder or torch would take late (after config.yaml), with a traceback,
# or silently (a run that trains to chance): each is refused when the config is resolved.
@pytest.mark.parametrize("flags,needles", [
    *[(["--set", f"optim.lr={v}"], ["optim.lr", shown, "finite number > 0"])
      for v, shown in [("-0.1", "-0.1"), ("0", "0.0"), (".nan", "nan"), (".inf", "inf"), ("1e999", "inf")]],
    (["--set", "optim.gamma=-0.1"], ["optim.gamma", "-0.1", "finite number > 0"]),
    (["--method", "cmtkd", "--set", "method_args.theta_lr_mult=.nan"], ["method_args.theta_lr_mult", "nan", ">= 0"]),
    (["--method", "cmtkd", "--set", "method_args.temperature=.inf"], ["method_args.temperature", "inf", "> 0"]),
    *[(["--set", f"optim.momentum={v}"], ["optim.momentum", shown, "[0, 1)"])
      for v, shown in [("-0.1", "-0.1"), ("1", "1.0"), ("1.5", "1.5"), (".nan", "nan")]],
    (["--set", "optim.nesterov=true", "--set", "optim.momentum=0"], ["optim.nesterov", "optim.momentum=0.0", "> 0"]),
    *[(["--set", f"optim.weight_decay={v}"], ["optim.weight_decay", shown, "finite number >= 0"])
      for v, shown in [("-1e-4", "-0.0001"), (".nan", "nan"), (".inf", "inf")]],
    (["--set", "optim.warmup_epochs=-1"], ["optim.warmup_epochs", "-1", ">= 0"]),
    *[(["--set", f"model.width={v}"], ["model.width", shown, "finite number > 0"])
      for v, shown in [(".inf", "inf"), (".nan", "nan"), ("-0.5", "-0.5")]],
    (["--seed", str(2**63)], ["seed", str(2**63), "0..2**63-1"]),
    (["--seed", "-1"], ["seed", "-1", "0..2**63-1"]),
    (["--set", "data.split_seed=-1"], ["data.split_seed", "-1", "0..2**63-1"]),
    (["--threads", "100000"], ["train.threads", "100000", "0..4096"]),
    (["--threads", "-5"], ["train.threads", "-5", "0..4096"]),
])
def test_bad_numbers_fail_before_anything_is_written(capsys, tmp_path, flags, needles):
    out = tmp_path / "run"
    assert_user_error(capsys, ["train", *QAT, "--epochs", "1", *flags, "--out", str(out)], *needles)
    assert not out.exists()


def test_extreme_but_valid_numbers_are_accepted(capsys):
    argv = ["train", *QAT, "--seed", str(2**63 - 1), "--threads", "4096", "--set", "optim.momentum=0",
            "--set", "optim.weight_decay=0", "--print-config"]
    assert main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["seed"] == 2**63 - 1 and cfg["train"]["threads"] == 4096 and cfg["optim"]["weight_decay"] == 0.0


@pytest.mark.parametrize("flag", ["--w-bits", "--a-bits"])
@pytest.mark.parametrize("bits", ["0", "9", "33"])
def test_bits_out_of_range(capsys, tmp_path, flag, bits):
    out = tmp_path / "run"
    line = assert_user_error(capsys, ["train", *QAT, flag, bits, "--out", str(out)], bits, "1..8 or 32")
    assert flag[2:].replace("-", "_") in line  # names the offending option
    assert not out.exists()


def test_fp_with_low_bits(capsys, tmp_path):
    assert_user_error(capsys, ["train", "--method", "fp", "--w-bits", "2", "--out", str(tmp_path / "r")],
                      "method fp", "--w-bits")


def test_missing_cifar100_names_the_path(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(capsys, ["train", *QAT[:4], "--dataset", "cifar100", "--data-root", str(empty),
                               "--epochs", "1", "--out", str(tmp_path / "run")],
                      str(empty), "CIFAR-100")


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_user_error(capsys, ["train", *QAT, "--epochs", "1", "--out", str(blocker / "run")],
                      str(blocker / "run"), "--out")


def test_bad_yaml_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [0.1\n")
    assert_user_error(capsys, ["train", "--config", str(bad), "--print-config"], str(bad), "YAML")


def test_yaml_file_with_unknown_key(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim:\n  learning_rate: 0.1\n")
    assert_user_error(capsys, ["train", "--config", str(cfg), "--print-config"], "optim.learning_rate")


@pytest.mark.parametrize("content,needles", [
    (b"\xff\xfe", ["not UTF-8", "0xff"]),
    (b"optim:\n  lr: 0.1\n  lr: 0.2\n", ["'lr' appears twice", "line 3"]),
    (b"a: &x [1, 2]\nb: *x\n", ["anchors and aliases", "line 1"]),
    (b"optim: {lr: 0.1, momentum: *m}\n", ["anchors and aliases"]),  # an alias alone, never defined
])
def test_yaml_file_that_cmtkd_refuses(capsys, tmp_path, content, needles):
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(content)
    out = tmp_path / "run"
    assert_user_error(capsys, ["train", *QAT, "--config", str(cfg), "--out", str(out)], str(cfg), *needles)
    assert not out.exists()


def test_an_alias_bomb_is_refused_at_once(capsys, tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]  # 10**9 strings if expanded
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert_user_error(capsys, ["train", "--config", str(bomb), "--print-config"], str(bomb), "anchors and aliases")


def test_set_value_with_an_alias_is_refused(capsys, tmp_path):
    assert_user_error(capsys, ["train", *QAT, "--set", "optim.milestones=[&a 1, *a]", "--print-config"],
                      "--set optim.milestones", "anchors and aliases")


def test_missing_yaml_file(capsys, tmp_path):
    assert_user_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml"), "--print-config"],
                      "nope.yaml", "does not exist")


def test_evaluate_a_directory_that_is_not_a_run(capsys, tmp_path):
    assert_user_error(capsys, ["evaluate", str(tmp_path)], str(tmp_path), "config.yaml")


def fake_run(folder, arch="alexnet", config_bytes: bytes | None = None):
    """A run directory as `cmtkd train` leaves it (config.yaml, model.pt) with an untrained student:
    enough for evaluate/export to get past loading, without training."""
    from dataclasses import asdict

    from cmtkd.checkpoint import save_model
    from cmtkd.config import build_config, config_hash
    from cmtkd.models import build_model

    cfg = build_config([{"method": "qat", "arch": arch, "model": {"width": 0.0625}, "train": {"device": "cpu"}}])
    arch_config = dict(arch=arch, num_classes=10, in_channels=1, variant="cifar", width=0.0625, w_bits=2, a_bits=2,
                       policy="fp-first-last", weight_quant="auto", act_quant="hwgq", quant_layout="conv-inputs")
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_bytes(config_bytes if config_bytes is not None
                                         else yaml.safe_dump(asdict(cfg)).encode())
    save_model(folder / "model.pt", arch_config=arch_config, state_dict=build_model(**arch_config).state_dict(),
               method="qat", selected_epoch=1, config_hash=config_hash(cfg))
    return folder


@pytest.mark.parametrize("size,needles", [
    ("0", ["--image-size", "got 0", "1..1024"]),
    ("-3", ["--image-size", "got -3", "1..1024"]),
    ("100000", ["--image-size", "got 100000", "1..1024"]),
    ("2", ["--image-size 2", "alexnet", "cannot take 2x2 images"]),  # AlexNet's pooling needs >= 8 pixels
])
def test_export_refuses_image_sizes_the_student_cannot_take(capsys, tmp_path, size, needles):
    run, out = fake_run(tmp_path / "run"), tmp_path / "student.pt2"
    assert_user_error(capsys, ["export", str(run), "--image-size", size, "--out", str(out)], *needles)
    assert not out.exists() and not (run / "student.pt2").exists()


def test_export_at_the_smallest_size_alexnet_takes(capsys, tmp_path):
    run, out = fake_run(tmp_path / "run"), tmp_path / "student.pt2"
    assert main(["export", str(run), "--image-size", "8", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["input"] == [1, 8, 8] and out.is_file()


@pytest.mark.parametrize("threads", ["-5", "100000"])
def test_evaluate_refuses_bad_threads(capsys, tmp_path, threads):
    run = fake_run(tmp_path / "run")
    assert_user_error(capsys, ["evaluate", str(run), "--threads", threads], "--threads", threads, "0..4096")
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("command", [["evaluate"], ["export"]])
def test_a_run_config_that_is_not_utf8(capsys, tmp_path, command):
    run = fake_run(tmp_path / "run", config_bytes=b"\xff\xfe")
    assert_user_error(capsys, [*command, str(run)], str(run / "config.yaml"), "not UTF-8")
    from cmtkd.api import load_run
    from cmtkd.errors import UserError

    with pytest.raises(UserError, match="not UTF-8"):
        load_run(run)


@pytest.mark.parametrize("argv,needle", [
    (["train", "--method", "magic"], "unknown method 'magic'"),
    (["train", "--w-bits", "33", "--print-config"], "w_bits"),
])
def test_console_errors_in_a_fresh_process(cli, argv, needle):
    proc = cli(*argv, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert proc.stdout == ""


# ----------------------------------------------------------------------------- help & list
def run_help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_top_level_help(capsys):
    out = run_help(capsys, ["--help"])
    for word in ("train", "evaluate", "list", "examples:"):
        assert word in out


def test_train_help(capsys):
    out = run_help(capsys, ["train", "--help"])
    for option in ("--method", "--arch", "--dataset", "--w-bits", "--a-bits", "--epochs", "--seed", "--out",
                   "--config", "--set", "--print-config", "--threads", "resume"):
        assert option in out, option


def test_evaluate_help(capsys):
    out = run_help(capsys, ["evaluate", "--help"])
    for word in ("run_dir", "--split", "eval.json"):
        assert word in out, word


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    methods = out.split("methods:")[1].split("archs:")[0]
    names = {line.split()[0] for line in methods.strip().splitlines()}
    assert {"fp", "qat"} <= names
    assert "resnet18" in out and "alexnet" in out and "digits" in out and "hwgq" in out


# ---------------------------------------------------------------------------- print-config
def test_print_config_is_resolved_yaml(capsys, tmp_path):
    assert main(["train", *QAT, "--set", "model.width=0.125", "--set", "optim.lr=1e-3", "--print-config",
                 "--out", str(tmp_path / "run")]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["method"], cfg["arch"], cfg["w_bits"], cfg["a_bits"]) == ("qat", "resnet18", 2, 2)
    assert cfg["model"]["width"] == 0.125
    assert cfg["optim"]["lr"] == pytest.approx(1e-3)  # YAML 1.1 reads "1e-3" as a string; accepted as float
    assert cfg["train"]["threads"] == 1
    assert cfg["method_args"] == {}
    assert not (tmp_path / "run").exists()

    # The printed config is a valid --config file that resolves to itself.
    saved = tmp_path / "printed.yaml"
    saved.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(saved), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == cfg


def test_print_config_resolves_method_defaults(capsys):
    assert main(["train", "--method", "fp", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["w_bits"], cfg["a_bits"]) == (32, 32)
    assert main(["train", "--method", "qat", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["w_bits"], cfg["a_bits"]) == (2, 2)


def test_settings_apply_in_order(capsys, tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("epochs: 7\nseed: 3\noptim:\n  lr: 0.2\n")
    assert main(["train", "--config", str(file), "--epochs", "5", "--set", "epochs=4", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["epochs"], cfg["seed"], cfg["optim"]["lr"]) == (4, 3, 0.2)


@pytest.mark.parametrize("command,says", [(["train"], "resume from the last finished epoch"),
                                          (["evaluate", "RUN"], "nothing was written"),
                                          (["export", "RUN"], "nothing was written")])
def test_ctrl_c_says_what_a_rerun_does(monkeypatch, capsys, command, says):
    """Only train resumes; evaluate and export write their one file at the end, atomically."""
    import cmtkd.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"cmd_{command[0]}", interrupted)
    assert cli.main(command) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmtkd: interrupted; ") and says in err and "\n" not in err


def test_yaml_merge_keys_still_load(tmp_path):
    """The strict loader refuses repeated keys and anchors, not an inline merge key."""
    from cmtkd.files import load_yaml_text

    assert load_yaml_text("a: {<<: {x: 1}, y: 2}") == {"a": {"x": 1, "y": 2}}
