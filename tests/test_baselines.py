"""Tests of the distillation baselines (kd, mtkd, dml, kdcl, kd-at) and of cmtkd.teachers.

- golden values: every loss term on fixed small inputs against the formula written out in numpy;
- frozen pre-trained teachers never change (kd, mtkd, kd-at); jointly trained ones do (dml, kdcl);
- every load_teacher failure is a one-line UserError naming the file;
- the shared losses of cmtkd.losses are what the methods call;
- end to end through the CLI: tiny teachers, then each student, then `cmtkd evaluate`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml

import cmtkd.losses
from cmtkd.baselines.dml import DML
from cmtkd.baselines.kdcl import KDCL
from cmtkd.baselines.kd import KD
from cmtkd.baselines.kd_at import KDAT
from cmtkd.baselines.mtkd import MTKD, confidence_weights, multi_teacher_kd
from cmtkd.cli import main as cli
from cmtkd.config import build_config
from cmtkd.data import DataInfo
from cmtkd.checkpoint import read_content, save_model
from cmtkd.files import sha256_file
from cmtkd.engine.trainer import build_optimizer
from cmtkd.errors import UserError
from cmtkd.models import build_model
from cmtkd.registry import get_method
from cmtkd.teachers import FrozenTeacher, load_teacher

torch.set_num_threads(1)

DIGITS = DataInfo(name="digits", num_classes=10, in_channels=1, image_size=28, variant="cifar",
                  num_train=3600, num_val=400, num_test=1000)
WIDTH = 0.125


# ------------------------------------------------------------------------------------------ helpers
def make_cfg(method: str, arch: str = "resnet18", w_bits: int = 2, a_bits: int = 2, **method_args):
    return build_config([{"method": method, "arch": arch, "w_bits": w_bits, "a_bits": a_bits,
                          "model": {"width": WIDTH}, "train": {"threads": 1}, "method_args": method_args}])


def save_model_file(path, arch="resnet18", num_classes=10, bits=4, seed=0):
    """A model.pt in the engine's format (random weights: these tests need no trained teacher)."""
    torch.manual_seed(seed)
    config = {"arch": arch, "num_classes": num_classes, "in_channels": 1, "variant": "cifar", "width": WIDTH,
              "w_bits": bits, "a_bits": bits, "policy": "fp-first-last", "weight_quant": "auto", "act_quant": "hwgq",
              "quant_layout": "conv-inputs"}
    model = build_model(**config)
    with torch.no_grad():  # non-default BN statistics, so a teacher put in train mode would change them
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, arch_config=config, state_dict=model.state_dict(), method="qat", selected_epoch=1,
               config_hash="test")
    return path


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {"w4": save_model_file(root / "w4" / "model.pt", bits=4, seed=1),
            "fp": save_model_file(root / "fp" / "model.pt", bits=32, seed=2)}


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_ce(z, y):
    return float(-np_log_softmax(z)[np.arange(len(y)), y].mean())


def np_kd(student, target_probs, temperature):
    """T^2 * KL(p || softmax(student / T)), mean over the batch."""
    log_q = np_log_softmax(student / temperature)
    return float(temperature**2 * (target_probs * (np.log(target_probs) - log_q)).sum(axis=1).mean())


def t(a):
    return torch.tensor(np.asarray(a), dtype=torch.float32)


S = np.array([[2.0, -1.0, 0.5, 0.0], [0.3, 0.2, -0.7, 1.5], [-1.2, 0.4, 2.2, 0.1]])
T1 = np.array([[3.0, 0.0, 1.0, -1.0], [0.0, 0.5, -0.5, 2.5], [0.0, 1.0, 1.5, 0.0]])
T2 = np.array([[0.5, 2.5, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 3.0, 1.0]])
Y = np.array([0, 3, 2])


# ------------------------------------------------------------------------------ golden loss values
def test_kd_loss_terms_match_formula(teacher_files):
    method = KD(make_cfg("kd", teacher=str(teacher_files["w4"]), alpha=0.7, beta=0.3, temperature=2.0), DIGITS)
    terms = method.loss_terms(t(S), t(T1), torch.tensor(Y))
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx(0.7 * np_ce(S, Y), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.3 * np_kd(S, np_softmax(T1 / 2.0), 2.0), rel=1e-5)


def test_kd_term_closed_form(teacher_files):
    # uniform student vs teacher probabilities (1/2, 1/6, 1/6, 1/6) at T = 2:
    # T^2 KL = 4 * (1/2 log 2 + 1/2 log(2/3)) = 2 log(4/3)
    method = KD(make_cfg("kd", teacher=str(teacher_files["w4"]), beta=1.0, temperature=2.0), DIGITS)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0, 0.0, 0.0]])
    terms = method.loss_terms(torch.zeros(1, 4), teacher, torch.tensor([0]))
    assert terms["kd"].item() == pytest.approx(2 * math.log(4 / 3), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(math.log(4), rel=1e-6)


def test_confidence_weights_formula():
    weights = confidence_weights([t(T1), t(T2)], torch.tensor(Y)).numpy()
    ce = np.stack([-np_log_softmax(z)[np.arange(3), Y] for z in (T1, T2)], axis=1)
    expected = np.exp(-ce) / np.exp(-ce).sum(axis=1, keepdims=True)            # softmax_i(-CE_i)
    true_prob = np.stack([np_softmax(z)[np.arange(3), Y] for z in (T1, T2)], axis=1)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    np.testing.assert_allclose(weights, true_prob / true_prob.sum(axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    assert weights[0, 0] > weights[0, 1]  # teacher 1 puts more mass on the true class 0


def test_mtkd_aggregations_match_their_formulas():
    # Crafted so the teachers disagree: T1 is confident in class 0, T2 in class 1.
    student = np.array([[0.2, 0.1, -0.3, 0.0], [0.0, 0.4, 0.1, -0.2]])
    teacher_a = np.array([[4.0, 0.0, 0.0, 0.0], [3.0, -1.0, 0.0, 0.0]])
    teacher_b = np.array([[0.0, 4.0, 0.0, 0.0], [-1.0, 3.0, 0.0, 0.5]])
    y, temp = np.array([0, 1]), 2.0
    probs = [np_softmax(z / temp) for z in (teacher_a, teacher_b)]
    expected = {
        "avg_probs": np_kd(student, (probs[0] + probs[1]) / 2, temp),
        "avg_kl": (np_kd(student, probs[0], temp) + np_kd(student, probs[1], temp)) / 2,
    }
    true_prob = np.stack([np_softmax(z)[np.arange(2), y] for z in (teacher_a, teacher_b)], axis=1)
    w = true_prob / true_prob.sum(axis=1, keepdims=True)
    expected["confidence"] = np_kd(student, w[:, :1] * probs[0] + w[:, 1:] * probs[1], temp)
    got, grads = {}, {}
    for aggregation, formula in expected.items():
        z = t(student).requires_grad_(True)
        value = multi_teacher_kd(z, [t(teacher_a), t(teacher_b)], torch.tensor(y), aggregation, temp)
        value.backward()
        got[aggregation], grads[aggregation] = value.item(), z.grad
        assert got[aggregation] == pytest.approx(formula, rel=1e-5), aggregation
    assert abs(got["avg_probs"] - got["avg_kl"]) > 0.1
    assert abs(got["confidence"] - got["avg_probs"]) > 0.1
    # documented: frozen teachers make avg_probs and avg_kl differ by a student-independent constant
    torch.testing.assert_close(grads["avg_probs"], grads["avg_kl"])


def test_mtkd_loss_terms_weighting(teacher_files):
    cfg = make_cfg("mtkd", teachers=[str(teacher_files["w4"]), str(teacher_files["fp"])],
                   aggregation="avg_kl", alpha=0.5, beta=2.0, temperature=3.0)
    terms = MTKD(cfg, DIGITS).loss_terms(t(S), [t(T1), t(T2)], torch.tensor(Y))
    expected_kd = (np_kd(S, np_softmax(T1 / 3), 3.0) + np_kd(S, np_softmax(T2 / 3), 3.0)) / 2
    assert terms["ce"].item() == pytest.approx(0.5 * np_ce(S, Y), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(2.0 * expected_kd, rel=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_kdcl_loss_terms_match_formula(reduction):
    cfg = make_cfg("kdcl", teacher_bits=[8, 4], teacher_reduction=reduction, temperature=2.0)
    terms = KDCL(cfg, DIGITS).loss_terms(t(S), [t(T1), t(T2)], torch.tensor(Y))
    # KDCL-MinLogit over ALL models: shift so the true-class logit is 0, element-wise minimum
    rows = np.arange(3)
    ensemble = np.min([z - z[rows, Y][:, None] for z in (T1, T2, S)], axis=0)
    p = np_softmax(ensemble / 2.0)
    reduce = np.sum if reduction == "sum" else np.mean
    expected = {"ce_student": 1.0 * np_ce(S, Y),
                "ce_teachers": 1.0 * reduce([np_ce(T1, Y), np_ce(T2, Y)]),
                "kl_student": 0.5 * np_kd(S, p, 2.0),
                "kl_teachers": 0.5 * reduce([np_kd(T1, p, 2.0), np_kd(T2, p, 2.0)])}
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key


def np_kl(p, q):
    """KL(p || q) per sample, mean over the batch."""
    return float((p * (np.log(p) - np.log(q))).sum(axis=1).mean())


def test_dml_loss_terms_match_zhang_et_al():
    # Zhang et al. (CVPR 2018), K networks: L_k = CE_k + 1/(K-1) sum_{l != k} KL(p_l || p_k), T = 1.
    terms = DML(make_cfg("dml", teacher_bits=[8, 4]), DIGITS).loss_terms(t(S), [t(T1), t(T2)], torch.tensor(Y))
    p = {name: np_softmax(z) for name, z in (("S", S), ("T1", T1), ("T2", T2))}
    expected = {
        "ce_student": np_ce(S, Y),
        "ce_teachers": np_ce(T1, Y) + np_ce(T2, Y),
        "kl_student": (np_kl(p["T1"], p["S"]) + np_kl(p["T2"], p["S"])) / 2,
        "kl_teachers": (np_kl(p["S"], p["T1"]) + np_kl(p["T2"], p["T1"])) / 2
                       + (np_kl(p["S"], p["T2"]) + np_kl(p["T1"], p["T2"])) / 2,
    }
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key


def test_dml_two_networks_closed_form_and_gradients():
    # K = 2: each network gets CE + KL(p_peer || p_self); the peer is a constant target, so the
    # KL gradient w.r.t. a network's logits is p_self - p_peer (T = 1), and nothing flows to the peer.
    method = DML(make_cfg("dml", teacher_bits=[8]), DIGITS)
    student = torch.zeros(1, 4, requires_grad=True)                              # uniform
    teacher = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]], requires_grad=True)  # (1/2, 1/6, 1/6, 1/6)
    terms = method.loss_terms(student, [teacher], torch.tensor([0]))
    assert terms["kl_student"].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-6)
    assert terms["kl_teachers"].item() == pytest.approx(-math.log(4) + 0.25 * math.log(2) + 0.75 * math.log(6),
                                                        rel=1e-6)  # KL(uniform || p_T)
    terms["kl_student"].backward()
    assert teacher.grad is None
    p_teacher = torch.tensor([[0.5, 1 / 6, 1 / 6, 1 / 6]])
    torch.testing.assert_close(student.grad, torch.full((1, 4), 0.25) - p_teacher)


def test_old_dml_run_config_fails_with_one_line_naming_kdcl(tmp_path):
    """A run directory of the method called dml before it was renamed kdcl: its config.yaml holds
    KDCL options; loading it as today's dml must fail, saying what happened and the fix."""
    from cmtkd.config import load_run_config

    old = build_config([{"method": "kdcl", "arch": "alexnet", "model": {"width": WIDTH},
                         "method_args": {"teacher_bits": [8, 4]}}])
    config = dataclasses.asdict(old)
    config["method"] = "dml"  # what the old version wrote
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(UserError) as info:
        load_run_config(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "renamed `kdcl`" in message and "method_args.teacher_reduction" in message
    config["method"] = "kdcl"  # the fix the message names
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert load_run_config(tmp_path).method_args["teacher_reduction"] == "sum"


def test_kd_at_attention_term_matches_formula(teacher_files):
    cfg = make_cfg("kd-at", teacher=str(teacher_files["fp"]), feature_stages=["layer1", "layer2"], gamma=50.0)
    method = KDAT(cfg, DIGITS)
    g = torch.Generator().manual_seed(0)
    student = {"layer1": torch.randn(2, 3, 4, 4, generator=g), "layer2": torch.randn(2, 5, 2, 2, generator=g)}
    teacher = {"layer1": torch.randn(2, 6, 4, 4, generator=g), "layer2": torch.randn(2, 2, 2, 2, generator=g)}

    def at(f):  # channel mean of squares, flattened, L2-normalised (p = 2)
        a = (f.numpy().astype(np.float64) ** 2).mean(axis=1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = 50.0 * sum(((at(student[k]) - at(teacher[k])) ** 2).mean() for k in ("layer1", "layer2"))
    assert method.attention_term(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(UserError, match="layer1"):
        method.attention_term({**student, "layer1": torch.randn(2, 3, 8, 8)}, teacher)


def test_methods_call_the_shared_losses(teacher_files, monkeypatch):
    calls = {}
    for name in ("kd_kl", "soft_targets", "min_logit_ensemble", "attention_loss"):
        original = getattr(cmtkd.losses, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cmtkd.losses, name, counting)
    y = torch.tensor(Y)
    KD(make_cfg("kd", teacher=str(teacher_files["w4"])), DIGITS).loss_terms(t(S), t(T1), y)
    assert calls == {"kd_kl": 1, "soft_targets": 1}
    MTKD(make_cfg("mtkd", teachers=[str(teacher_files["w4"])] * 2), DIGITS).loss_terms(t(S), [t(T1), t(T2)], y)
    assert calls == {"kd_kl": 2, "soft_targets": 3}
    KDCL(make_cfg("kdcl", teacher_bits=[8, 4]), DIGITS).loss_terms(t(S), [t(T1), t(T2)], y)
    assert calls == {"kd_kl": 5, "soft_targets": 4, "min_logit_ensemble": 1}
    DML(make_cfg("dml", teacher_bits=[8, 4]), DIGITS).loss_terms(t(S), [t(T1), t(T2)], y)
    assert calls == {"kd_kl": 11, "soft_targets": 4, "min_logit_ensemble": 1}  # 3 networks x 2 peers
    method = KDAT(make_cfg("kd-at", teacher=str(teacher_files["fp"])), DIGITS)
    images = torch.randn(2, 1, 28, 28)
    method.forward_train(images, torch.tensor([0, 1]))
    assert calls["attention_loss"] == 3 and calls["kd_kl"] == 12


# ------------------------------------------------------------------- frozen vs trained teachers
def run_steps(method, cfg, steps=3, batch=8):
    optimizer = build_optimizer(method, cfg)  # also checks the groups cover every trainable parameter
    method.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images = torch.randn(batch, 1, 28, 28, generator=g)
        targets = torch.randint(0, 10, (batch,), generator=g)
        logits, terms = method.forward_train(images, targets)
        assert logits.shape == (batch, 10) and all(torch.isfinite(v) for v in terms.values())
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


@pytest.mark.parametrize("method_name", ["kd", "mtkd", "kd-at"])
def test_pretrained_teachers_do_not_change(method_name, teacher_files):
    args = ({"teachers": [str(teacher_files["w4"]), str(teacher_files["fp"])]} if method_name == "mtkd"
            else {"teacher": str(teacher_files["fp" if method_name == "kd-at" else "w4"])})
    cfg = make_cfg(method_name, **args)
    method = get_method(method_name)(cfg, DIGITS)
    teachers = list(method.teachers) if method_name == "mtkd" else [method.teacher]
    before = [snapshot(teacher) for teacher in teachers]
    student_before = snapshot(method.student)
    run_steps(method, cfg)
    assert method.student.training and all(not m.training for teacher in teachers for m in teacher.modules())
    for teacher, state in zip(teachers, before):
        assert changed(state, teacher) == []  # weights and BatchNorm statistics
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert changed(student_before, method.student)
    [group_names] = [[g["name"] for g in method.param_groups()]]
    assert group_names == ["student"]


@pytest.mark.parametrize("name, cls", [("dml", DML), ("kdcl", KDCL)])
def test_mutual_learning_teachers_train_jointly(name, cls):
    cfg = make_cfg(name, teacher_bits=[8, 4])
    method = cls(cfg, DIGITS)
    before = [snapshot(teacher) for teacher in method.teachers]
    run_steps(method, cfg, steps=2)
    for teacher, state in zip(method.teachers, before):
        assert any(".weight" in k for k in changed(state, teacher))
    groups = {g["name"]: g for g in method.param_groups()}
    assert list(groups) == ["student", "teacher0_w8a8", "teacher1_w4a4"]
    assert groups["student"]["weight_decay"] == 2.5e-5        # 1-2-bit network
    assert groups["teacher0_w8a8"]["weight_decay"] == 1e-4   # bit-dependent, per network
    assert list(method.eval_models()) == ["student", "teacher0_w8a8", "teacher1_w4a4"]
    assert method.metadata()["teacher_bits"] == [8, 4]


# -------------------------------------------------------------------------------- load_teacher
def test_load_teacher_returns_frozen_model_and_hash(teacher_files):
    file = teacher_files["w4"]
    digest = sha256_file(file)
    model, found = load_teacher(file.parent, arch="resnet18", num_classes=10, w_bits=4, a_bits=4,
                                expected_sha256=digest.upper())
    assert found == digest
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    frozen = FrozenTeacher(file, arch="resnet18", num_classes=10)
    frozen.train()
    assert not frozen.training and frozen.sha256 == digest and frozen.path == str(file.resolve())


@pytest.mark.parametrize("case, kwargs, found", [
    ("wrong arch", {"arch": "alexnet"}, ["alexnet", "resnet18"]),
    ("wrong classes", {"num_classes": 100}, ["100", "10"]),
    ("wrong w bits", {"w_bits": 8}, ["w_bits", "8", "4"]),
    ("wrong a bits", {"a_bits": 2}, ["a_bits", "2", "4"]),
    ("wrong channels", {"in_channels": 3}, ["in_channels", "3", "1"]),
    ("sha mismatch", {"expected_sha256": "0" * 64}, ["0" * 64, "found"]),
])
def test_load_teacher_mismatches_are_user_errors(teacher_files, case, kwargs, found):
    file = teacher_files["w4"]
    args = {"arch": "resnet18", "num_classes": 10, **kwargs}
    with pytest.raises(UserError) as info:
        load_teacher(file.parent, **args)
    message = str(info.value)
    assert str(file) in message and "\n" not in message
    for word in found:
        assert word in message, (case, message)
    if case == "sha mismatch":
        assert sha256_file(file) in message


def test_load_teacher_bad_files_are_user_errors(tmp_path, teacher_files):
    good = teacher_files["w4"].read_bytes()
    files = {"truncated": good[: len(good) // 2], "garbage": b"not a torch file"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"state_dict": {}}, tmp_path / "not_a_model")
    save_model(tmp_path / "bad_weights", arch_config={"arch": "resnet18", "num_classes": 10, "in_channels": 1},
               state_dict={"x": torch.ones(1)}, method="qat", selected_epoch=1, config_hash="test")
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    for path in [tmp_path / "missing", empty_run, *(tmp_path / n for n in files), tmp_path / "not_a_model",
                 tmp_path / "bad_weights"]:
        with pytest.raises(UserError) as info:
            load_teacher(path, arch="resnet18", num_classes=10)
        assert str(path) in str(info.value) and "\n" not in str(info.value), path


def test_load_teacher_checks_the_digits_size_its_run_trained_on(tmp_path, teacher_files):
    run = tmp_path / "teacher_run"
    run.mkdir()
    shutil.copy(teacher_files["w4"], run / "model.pt")
    args = {"arch": "resnet18", "num_classes": 10}
    load_teacher(run, **args, image_size=14)  # no config.yaml beside it: nothing to compare
    (run / "config.yaml").write_text("data: {name: digits, image_size: 14}\n")
    load_teacher(run, **args, image_size=14)
    load_teacher(run, **args)  # the caller gave no size
    with pytest.raises(UserError, match=r"trained on 14x14 digits, this run sees 28x28"):
        load_teacher(run / "model.pt", **args, image_size=28)
    (run / "config.yaml").write_text("data: {name: digits}\n")  # unset: the native 28
    load_teacher(run, **args, image_size=28)
    with pytest.raises(UserError, match=r"trained on 28x28 digits, this run sees 14x14"):
        FrozenTeacher(run, **args, image_size=14)
    (run / "config.yaml").write_text("data: {name: cifar100}\n")  # no size option there
    load_teacher(run, **args, image_size=14)


def test_method_rejects_teacher_of_other_arch(teacher_files):
    with pytest.raises(UserError, match="arch expected alexnet, found resnet18"):
        KD(make_cfg("kd", arch="alexnet", teacher=str(teacher_files["w4"])), DIGITS)


# ------------------------------------------------------------------------------- option checks
@pytest.mark.parametrize("method, kwargs, match", [
    ("kd", {}, "needs a pre-trained teacher"),
    ("kd", {"teacher": "x", "teacher_sha256": "abc"}, "SHA-256"),
    ("kd", {"teacher": "x", "beta": -1.0}, "beta"),
    ("kd", {"teacher": "x", "temperature": 0.0}, "temperature"),
    ("mtkd", {}, "needs pre-trained teachers"),
    ("mtkd", {"teachers": ["a", "b"], "teacher_sha256": ["0" * 64]}, "one hash per teacher"),
    ("mtkd", {"teachers": ["a"], "aggregation": "max"}, "aggregation"),
    ("dml", {"teacher_bits": []}, "empty"),
    ("dml", {"teacher_bits": [8, 2]}, "more bits"),
    ("dml", {"teacher_bits": [9]}, "teacher_bits"),
    ("dml", {"temperature": 4.0}, "renamed `kdcl`"),
    ("kdcl", {"teacher_bits": [8, 2]}, "more bits"),
    ("kdcl", {"teacher_reduction": "max"}, "teacher_reduction"),
    ("kd-at", {"teacher": "x", "feature_stages": ["head"]}, "layer1"),
    ("kd-at", {"teacher": "x", "feature_stages": []}, "empty"),
    ("kd-at", {"teacher": "x", "gamma": -1.0}, "gamma"),
    ("kd-at", {"teacher": "x", "gamma": float("nan")}, "method_args.gamma must be a finite number >= 0, got nan"),
    ("kd", {"teacher": "x", "alpha": float("inf")}, "method_args.alpha must be a finite number >= 0, got inf"),
    ("kd", {"teacher": "x", "temperature": float("nan")}, "temperature must be a finite number > 0, got nan"),
    ("kd-at", {"teacher": "x", "attention_reduction": "max"}, "attention_reduction"),
])
def test_option_checks_reject(method, kwargs, match):
    with pytest.raises(UserError, match=match):
        make_cfg(method, **kwargs)


def test_kd_at_alexnet_needs_conv_stage_names():
    with pytest.raises(UserError, match=r"alexnet.*conv2"):
        make_cfg("kd-at", arch="alexnet", teacher="x")
    cfg = make_cfg("kd-at", arch="alexnet", teacher="x", feature_stages=["conv2", "conv3", "conv4"])
    assert cfg.method_args["feature_stages"] == ["conv2", "conv3", "conv4"]


# -------------------------------------------------------------------------------- end to end (CLI)
COMMON = ["--arch", "alexnet", "--dataset", "digits", "--epochs", "1", "--threads", "1",
          "--set", f"model.width={WIDTH}", "--set", "data.batch_size=256", "--set", "train.progress=none"]


def cli_train(out, *args):
    assert cli(["train", *COMMON, *args, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def trained_teachers(tmp_path_factory):
    """A 4-bit and a full-precision AlexNet teacher, trained once for all end-to-end tests."""
    root = tmp_path_factory.mktemp("e2e")
    cli_train(root / "qat-w4a4", "--method", "qat", "--w-bits", "4", "--a-bits", "4")
    cli_train(root / "fp", "--method", "fp")
    return root


def check_evaluate(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert cli(["evaluate", str(run), "--threads", "1"]) == 0
    assert json.loads((run / "eval.json").read_text())["top1"] == metrics["top1"]
    return metrics


def teacher_weights_in_checkpoint(run, prefix):
    state = read_content(run / "checkpoint.pt")["method"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_e2e_kd(trained_teachers, tmp_path):
    teacher = trained_teachers / "qat-w4a4"
    digest = sha256_file(teacher / "model.pt")
    cli_train(tmp_path / "kd", "--method", "kd", "--set", f"method_args.teacher={teacher}",
              "--set", f"method_args.teacher_sha256={digest}")
    metrics = check_evaluate(tmp_path / "kd")
    assert metrics["method"] == "kd" and metrics["teacher_sha256"] == [digest]
    # the teacher the engine trained with is bit-identical to its file (frozen through a real run)
    saved = read_content(teacher / "model.pt")["state_dict"]
    used = teacher_weights_in_checkpoint(tmp_path / "kd", "teacher.model.")
    assert used.keys() == saved.keys() and all(torch.equal(used[k], saved[k]) for k in saved)
    assert sha256_file(teacher / "model.pt") == digest


def test_e2e_mtkd(trained_teachers, tmp_path):
    teachers = [trained_teachers / "qat-w4a4", trained_teachers / "fp"]
    cli_train(tmp_path / "mtkd", "--method", "mtkd", "--set", f"method_args.teachers=[{teachers[0]},{teachers[1]}]",
              "--set", "method_args.aggregation=confidence")
    metrics = check_evaluate(tmp_path / "mtkd")
    assert metrics["teacher_sha256"] == [sha256_file(d / "model.pt") for d in teachers]
    assert metrics["aggregation"] == "confidence"


@pytest.mark.parametrize("name", ["dml", "kdcl"])
def test_e2e_mutual_learning(tmp_path, name):
    cli_train(tmp_path / name, "--method", name, "--set", "method_args.teacher_bits=[8,4]")
    metrics = check_evaluate(tmp_path / name)
    assert metrics["teacher_bits"] == [8, 4]
    header = (tmp_path / name / "history.csv").read_text().splitlines()[0].split(",")
    for column in ("loss_ce_student", "loss_ce_teachers", "loss_kl_student", "loss_kl_teachers",
                   "val_top1_teacher0_w8a8", "val_top1_teacher1_w4a4"):
        assert column in header


def test_e2e_kd_at_and_evaluate_without_teacher(trained_teachers, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_teachers / "fp", teacher)
    run = tmp_path / "kd-at"
    cli_train(run, "--method", "kd-at", "--set", f"method_args.teacher={teacher}",
              "--set", "method_args.feature_stages=[conv2,conv3,conv4]")
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert {"loss_ce", "loss_kd", "loss_at"} <= set(header)
    digest = sha256_file(teacher / "model.pt")
    shutil.rmtree(teacher)  # evaluating a student never needs its teacher
    assert check_evaluate(run)["teacher_sha256"] == [digest]
    # a missing teacher is a one-line CLI error, not a traceback
    assert cli(["train", *COMMON, "--method", "kd", "--set", f"method_args.teacher={teacher}",
                "--out", str(tmp_path / "no-teacher")]) == 2
    assert str(teacher) in capsys.readouterr().err


def test_cli_list_describes_baselines(capsys):
    assert cli(["list"]) == 0
    out = capsys.readouterr().out
    for name, citation in [("kd", "Hinton"), ("mtkd", "You et al."), ("dml", "Zhang"), ("kdcl", "KDCL"), ("kd-at", "Zagoruyko")]:
        line = next(l for l in out.splitlines() if l.split()[:1] == [name])
        assert citation in line


def test_kd_run_interrupted_and_resumed_is_identical(trained_teachers, tmp_path):
    """The frozen teacher (weights, BN statistics, recorded hash) travels in checkpoint.pt: a killed
    kd run, rerun, ends bit-identical to an uninterrupted one."""
    from cmtkd.engine import train

    overrides = [{"method": "kd", "arch": "alexnet", "epochs": 2, "model": {"width": WIDTH},
                  "data": {"batch_size": 512}, "train": {"threads": 1, "progress": "none"},
                  "method_args": {"teacher": str(trained_teachers / "fp")}}]

    class Killed(Exception):
        pass

    def kill_after_first_epoch(line):
        if line.startswith("epoch 1/2"):
            raise Killed

    full = train(build_config(overrides), tmp_path / "full", log=lambda line: None)
    with pytest.raises(Killed):
        train(build_config(overrides), tmp_path / "resumed", log=kill_after_first_epoch)
    resumed = train(build_config(overrides), tmp_path / "resumed", log=lambda line: None)
    a, b = (read_content(tmp_path / d / "model.pt")["state_dict"]
            for d in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["top1"] == full["top1"] and resumed["teacher_sha256"] == full["teacher_sha256"]
