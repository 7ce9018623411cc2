"""``model.init_from``: a quantized run (student and jointly trained teachers) starts from a trained
network's weights; architecture, classes, channels, stem and width are checked; quantizer parameters
keep their own initialisation; the source's hash is recorded."""
from __future__ import annotations

import json

import pytest
import torch

from cmtkd import checkpoint
from cmtkd.cli import main
from cmtkd.config import build_config
from cmtkd.data import build_data
from cmtkd.engine.io import sha256_file
from cmtkd.errors import UserError
from cmtkd.initialization import is_quantizer_state
from cmtkd.models import build_model
from cmtkd.registry import get_method
from conftest import tiny_args

ARCH = dict(arch="resnet18", num_classes=10, in_channels=1, variant="cifar", width=0.125)


def save_model_file(path, w_bits=32, a_bits=32, seed=5, **changes):
    """A model.pt as `cmtkd train` writes it, with random (seeded) weights."""
    torch.manual_seed(seed)
    config = {**ARCH, "w_bits": w_bits, "a_bits": a_bits, "policy": "fp-first-last", "weight_quant": "auto",
              "act_quant": "hwgq", "quant_layout": "conv-inputs", **changes}
    model = build_model(**config)
    for module in model.modules():  # non-default BatchNorm statistics, so copying them is visible
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_model(path, arch_config=config, state_dict=model.state_dict(), method="fp",
                          selected_epoch=1, config_hash="test")
    return model


def build_method(method: str, init_from: str, **extra):
    cfg = build_config([{"method": method, "arch": "resnet18", "w_bits": 2, "a_bits": 2,
                         "model": {"width": 0.125, "init_from": init_from}, **extra}])
    data = build_data(cfg.data, "cpu")
    return get_method(method)(cfg, data.info)


def assert_initialised_from(network, source):
    theirs = source.state_dict()
    checked = 0
    for key, value in network.state_dict().items():
        if is_quantizer_state(key):
            continue
        assert torch.equal(value, theirs[key]), key
        checked += 1
    assert checked > 50


def test_qat_student_starts_from_the_fp_network(tmp_path):
    source = save_model_file(tmp_path / "fp" / "model.pt")
    method = build_method("qat", str(tmp_path / "fp"))
    assert_initialised_from(method.student, source)
    assert method.init_metadata["init_sha256"] == sha256_file(tmp_path / "fp" / "model.pt")


def test_cmtkd_student_and_every_jointly_trained_teacher_start_from_it(tmp_path):
    source = save_model_file(tmp_path / "fp.pt")
    method = build_method("cmtkd", str(tmp_path / "fp.pt"), method_args={"teacher_bits": [8, 4]})
    for network in [method.student, *method.teachers]:
        assert_initialised_from(network, source)


def test_lsq_step_sizes_keep_their_own_data_dependent_init(tmp_path):
    """A W4A4 LSQ source: its step sizes (for 4 bits) are not copied into a W2A2 LSQ network."""
    save_model_file(tmp_path / "lsq.pt", w_bits=4, a_bits=4, weight_quant="lsq", act_quant="lsq")
    method = build_method("qat", str(tmp_path / "lsq.pt"),
                          model={"width": 0.125, "init_from": str(tmp_path / "lsq.pt"), "weight_quant": "lsq",
                                 "act_quant": "lsq"})
    steps = [m for k, m in method.student.state_dict().items() if k.endswith("initialized")]
    assert steps and not any(bool(s) for s in steps)  # still to be initialised from the first batch


@pytest.mark.parametrize("change,key", [
    ({"arch": "alexnet"}, "arch"),
    ({"num_classes": 5}, "num_classes"),
    ({"in_channels": 3}, "in_channels"),
    ({"width": 0.25}, "width"),
    ({"quant_layout": "block-outputs"}, "quant_layout"),
    ({"variant": "imagenet"}, "variant"),
])
def test_mismatched_source_is_one_error_naming_the_key(tmp_path, change, key):
    save_model_file(tmp_path / "other.pt", **change)
    with pytest.raises(UserError, match=rf"model.init_from=.*: {key} is"):
        build_method("qat", str(tmp_path / "other.pt"))


def test_cli_errors_leave_nothing_behind(tmp_path, capsys):
    out = tmp_path / "run"
    for source, needle in [(tmp_path / "missing", "no such run directory"),
                           (save_model_file(tmp_path / "a.pt", arch="alexnet") and tmp_path / "a.pt", "arch is")]:
        assert main(["train", *tiny_args(epochs=1), "--set", f"model.init_from={source}", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("cmtkd: error:") == 1 and needle in err and "Traceback" not in err, err
        assert not out.exists()


def test_training_from_a_trained_fp_run_records_the_source(tmp_path, capsys):
    fp = tmp_path / "fp"
    assert main(["train", *tiny_args("fp", epochs=1, w_bits=None, a_bits=None), "--out", str(fp)]) == 0
    out = tmp_path / "qat"
    assert main(["train", *tiny_args("qat", epochs=1), "--set", f"model.init_from={fp}", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["init_from"] == str(fp)
    assert metrics["init_sha256"] == sha256_file(fp / "model.pt")


def test_a_bad_init_source_is_named_as_such_not_as_a_teacher(tmp_path):
    """initialize_from loads through the teachers' loader: its errors name model.init_from's network."""
    from cmtkd.teachers import load_teacher

    with pytest.raises(UserError, match=r"^model.init_from network checkpoint: .* train the model.init_from network"):
        load_teacher(tmp_path / "missing", arch="alexnet", num_classes=10, role="model.init_from network")
    with pytest.raises(UserError, match=r"^teacher checkpoint: .* train the teacher first"):
        load_teacher(tmp_path / "missing", arch="alexnet", num_classes=10)
