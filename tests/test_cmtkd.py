"""CMT-KD: fusion (Eq. 1), gradients into every teacher and theta, loss composition, ablations,
golden values of the shared losses, exact resume with teachers and theta."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cmtkd.config import build_config
from cmtkd.data import DataInfo
from cmtkd.engine.trainer import build_optimizer
from cmtkd.errors import UserError
from cmtkd.losses import attention_loss, kd_kl, min_logit_ensemble, soft_targets
from cmtkd.methods.cmtkd import CMTKD
from cmtkd.quant import HWGQ, HWGQ_STEPS
from cmtkd.registry import get_method

INFO = DataInfo(name="digits", num_classes=10, in_channels=1, image_size=28, variant="cifar",
                num_train=64, num_val=0, num_test=0)


def make(method="cmtkd", seed=0, **args):
    sets = {"method": method, "arch": args.pop("arch", "resnet18"), "model": {"width": 0.125},
            **{k: args.pop(k) for k in ("w_bits", "a_bits") if k in args}, "method_args": args}
    cfg = build_config([sets])
    torch.manual_seed(seed)
    return get_method(cfg.method)(cfg, INFO)


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------- fusion, Eq. 1
def test_fusion_with_one_teacher_is_identity():
    a = torch.randn(2, 3, 4, 4)
    fused = CMTKD.fuse([a], torch.softmax(torch.tensor([0.7]), 0))
    assert torch.equal(fused, a)


def test_fusion_with_zero_theta_is_plain_average():
    feats = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    fused = CMTKD.fuse(feats, torch.softmax(torch.zeros(3), 0))
    torch.testing.assert_close(fused, sum(feats) / 3)


def test_fusion_weights_follow_softmax_theta():
    feats = [torch.full((1, 1, 2, 2), v) for v in (1.0, 2.0)]
    theta = torch.tensor([math.log(3.0), 0.0])  # softmax -> (0.75, 0.25)
    fused = CMTKD.fuse(feats, torch.softmax(theta, 0))
    torch.testing.assert_close(fused, torch.full((1, 1, 2, 2), 1.25))


def test_shared_knowledge_feeds_every_teachers_next_stage():
    m = make()
    m.train()
    seen = {}
    hooks = [t.stages["layer2"].register_forward_pre_hook(lambda mod, inp, i=i: seen.__setitem__(i, inp[0]))
             for i, t in enumerate(m.teachers)]
    images, _ = batch()
    _, shared, student_feats, _, _ = m.teachers_forward(images, m._units(m.student))
    for h in hooks:
        h.remove()
    assert set(seen) == {0, 1, 2}
    for i in range(3):
        assert seen[i] is shared["layer1"]  # by construction: the very tensor F_layer1
    # the fused tensor really mixes three different teacher features, each quantized at its own bits
    outs = [t.stages["layer1"](t.stages["stem"](images)) for t in m.teachers]
    assert not torch.allclose(outs[0], outs[1])
    torch.testing.assert_close(shared["layer1"], sum(q(a) for q, a in zip(m.fusion_quantizers, outs)) / 3)
    assert set(student_feats) == set(m.fusion_points) == {"layer1", "layer2", "layer3"}


def on_grid(x: torch.Tensor, bits: int) -> bool:
    """x holds only HWGQ levels at ``bits``: 0, s, 2s, ..., (2^b - 1) s."""
    step = HWGQ_STEPS[bits]
    levels = x / step
    return bool(((levels - levels.round()).abs() < 1e-3).all() and levels.min() >= 0
                and levels.max() <= 2**bits - 1 + 1e-3)


def test_shared_knowledge_is_built_from_each_teachers_quantized_stage_output():
    # Eq. 1 literally: F_k = sum_i pi_k^i Q(A_k^i, b_i). In the conv-inputs layout the stage outputs A
    # are full precision (off every grid), so Q must be applied in the fusion itself.
    m = make(teacher_bits=[8, 4], theta_init="random")
    assert m.cfg.model.quant_layout == "conv-inputs"
    images, _ = batch()
    outs = [t.stages["layer1"](t.stages["stem"](images)) for t in m.teachers]
    assert not on_grid(outs[1], 4) and (outs[1] < 0).any()  # full-precision residual stream
    with torch.no_grad():
        # one-hot importance: F_k is teacher i's stage output on teacher i's own grid
        for i, bits in enumerate((8, 4)):
            m.importance_logits.zero_()
            m.importance_logits[:, i] = 1e4
            _, shared, _, _, _ = m.teachers_forward(images)
            assert on_grid(shared["layer1"], bits), bits
            torch.testing.assert_close(shared["layer1"], m.fusion_quantizers[i](outs[i]))
        m.importance_logits.normal_(0.0, 1.0)
        _, shared, _, _, _ = m.teachers_forward(images)
    pi = m.importance()[0]
    expected = pi[0] * HWGQ(8)(outs[0]) + pi[1] * HWGQ(4)(outs[1])
    torch.testing.assert_close(shared["layer1"], expected)


def test_block_outputs_layout_fusion_is_unchanged_by_the_explicit_quantizer():
    # with block-outputs the stage outputs already end in the teacher's own HWGQ: Q is idempotent
    cfg = build_config([{"method": "cmtkd", "arch": "resnet18", "method_args": {"teacher_bits": [8, 4]},
                         "model": {"width": 0.125, "quant_layout": "block-outputs"}}])
    torch.manual_seed(0)
    m = get_method("cmtkd")(cfg, INFO)
    images, _ = batch()
    outs = [t.stages["layer1"](t.stages["stem"](images)) for t in m.teachers]
    for q, a, bits in zip(m.fusion_quantizers, outs, (8, 4)):
        assert on_grid(a, bits)
        assert torch.equal(q(a), a)


def test_fusion_point_presets_and_errors():
    assert make(fusion_points=["stage-ends+last"]).fusion_points == ["layer1", "layer2", "layer3", "layer4"]
    assert make(fusion_points=["blocks"]).fusion_points == [f"layer{i}.{j}" for i in (1, 2, 3) for j in (0, 1)]
    assert make(arch="alexnet").fusion_points == ["conv2", "conv3", "conv4"]
    assert make(fusion_points=["layer3", "layer1"]).fusion_points == ["layer1", "layer3"]
    with pytest.raises(UserError, match="fusion_points"):
        make(fusion_points=["layer9"])


# --------------------------------------------------------------------------- gradients, groups
def test_one_backward_reaches_every_teacher_and_theta():
    m = make()
    m.train()
    images, targets = batch()
    _, losses = m.forward_train(images, targets)
    sum(losses.values()).backward()
    for i, t in enumerate(m.teachers):
        grads = [p.grad for p in t.parameters()]
        assert all(g is not None for g in grads), f"teacher {i} has parameters without gradient"
        assert sum(g.abs().sum() for g in grads) > 0
    assert m.importance_logits.grad is not None
    assert (m.importance_logits.grad.abs() > 0).all(), "every theta_k^i must get a gradient"
    assert all(p.grad is not None for p in m.student.parameters())


def test_param_groups_theta_lr_and_weight_decay_by_bits():
    m = make()
    opt = build_optimizer(m, m.cfg)  # also asserts exact coverage of trainable parameters
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["importance_logits"]["lr"] == pytest.approx(m.cfg.optim.lr / 10)
    assert groups["importance_logits"]["weight_decay"] == 0.0
    assert groups["student"]["weight_decay"] == 2.5e-5  # W2A2
    assert groups["teacher0_w8a8"]["weight_decay"] == 1e-4
    assert groups["teacher2_w4a4"]["weight_decay"] == 1e-4


def test_average_teacher_ablation_keeps_theta_uniform():
    m = make("cmtkd-avg")
    opt = build_optimizer(m, m.cfg)
    assert "importance_logits" not in {g["name"] for g in opt.param_groups}
    before = m.importance_logits.detach().clone()
    m.train()
    for step in range(2):
        images, targets = batch(seed=step)
        _, losses = m.forward_train(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert torch.equal(m.importance_logits.detach(), before)
    torch.testing.assert_close(m.importance(), torch.full((3, 3), 1 / 3))


def test_theta_moves_for_full_method():
    m = make()
    opt = build_optimizer(m, m.cfg)
    m.train()
    before = m.importance_logits.detach().clone()
    images, targets = batch()
    _, losses = m.forward_train(images, targets)
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(m.importance_logits.detach(), before)


# ------------------------------------------------------------------------------ loss terms
def test_total_loss_is_alpha_beta_gamma_composition():
    images, targets = batch()
    base = make(alpha=1.0, beta=1.0, gamma=1.0)
    base.train()
    torch.manual_seed(0)
    _, unit = base.forward_train(images, targets)
    scaled = make(alpha=0.3, beta=0.7, gamma=11.0)
    scaled.load_state_dict(base.state_dict())
    scaled.train()
    _, terms = scaled.forward_train(images, targets)
    assert set(terms) == {"ce_student", "ce_teachers", "kl_student", "kl_teachers", "feat"}
    for k, w in [("ce_student", 0.3), ("ce_teachers", 0.3), ("kl_student", 0.7), ("kl_teachers", 0.7), ("feat", 11.0)]:
        torch.testing.assert_close(terms[k], w * unit[k])


def test_loss_terms_match_their_definitions():
    m = make(alpha=1.0, beta=1.0, gamma=1.0, temperature=3.0)
    m.eval()  # BN in eval mode: repeated forwards give identical outputs
    images, targets = batch()
    z_s, terms = m.forward_train(images, targets)
    teacher_logits, shared, student_feats, _, _ = m.teachers_forward(images, m._units(m.student))
    z_t = torch.stack(teacher_logits).mean(0)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(terms["ce_student"], ce(z_s, targets))
    torch.testing.assert_close(terms["ce_teachers"], ce(z_t, targets))
    p = soft_targets(min_logit_ensemble([z_t, z_s], targets), 3.0)
    torch.testing.assert_close(terms["kl_student"], kd_kl(z_s, p, 3.0))
    torch.testing.assert_close(terms["kl_teachers"], kd_kl(z_t, p, 3.0))
    feat = sum(attention_loss(student_feats[k], shared[k]) for k in m.fusion_points)
    torch.testing.assert_close(terms["feat"], feat)


def test_noml_and_nofeat_drop_their_terms():
    images, targets = batch()
    _, t = make("cmtkd-noml").forward_train(images, targets)
    assert "kl_student" not in t and "feat" in t
    _, t = make("cmtkd-nofeat").forward_train(images, targets)
    assert "feat" not in t and "kl_student" in t


def test_one_teacher_ablation():
    m = make("cmtkd-1t")
    assert len(m.teachers) == 1 and m.teacher_bits == [8]
    images, targets = batch()
    _, terms = m.forward_train(images, targets)
    assert torch.isfinite(sum(terms.values()))


def test_per_teacher_and_all_heads_options():
    images, targets = batch()
    for args in ({"teacher_logit": "all"}, {"teacher_loss": "per_teacher"}):
        _, terms = make(**args).forward_train(images, targets)
        assert torch.isfinite(sum(terms.values()))


# --------------------------------------------------------------- golden values, shared losses
def test_min_logit_ensemble_hand_example():
    z1 = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    z2 = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    targets = torch.tensor([0, 1])
    ens = min_logit_ensemble([z1, z2], targets)
    # row 0 (target 0): shifted z1 = [0,-1,-2], z2 = [0,3,1] -> min [0,-1,-2]
    # row 1 (target 1): shifted z1 = [1,0,-1], z2 = [-3,0,-2] -> min [-3,0,-2]
    assert torch.equal(ens, torch.tensor([[0.0, -1.0, -2.0], [-3.0, 0.0, -2.0]]))


def test_kd_kl_hand_example():
    T = 2.0
    target_logits = [0.0, -1.0, -2.0]
    student = [1.0, 0.5, -0.5]

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    p, q = softmax(target_logits), softmax(student)
    expected = T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = kd_kl(torch.tensor([student]), soft_targets(torch.tensor([target_logits]), T), T)
    assert got.item() == pytest.approx(expected, rel=1e-5)  # float32


def test_attention_loss_golden_values():
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # mean_c F^2 = [5, 10]
    t = torch.tensor([[[[1.0, 1.0]]]])                # mean_c F^2 = [1, 1]
    assert attention_loss(s, t, "mean").item() == pytest.approx(0.05131670194948619, rel=1e-6)
    assert attention_loss(s, t, "sum").item() == pytest.approx(0.10263340389897238, rel=1e-6)
    assert attention_loss(s, s).item() == 0.0


# ------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("bits", [[2], [8, 2], [8, 1]])
def test_teacher_set_not_higher_than_student_is_rejected(bits):
    with pytest.raises(UserError, match="teacher"):
        make(teacher_bits=bits)


def test_bad_options_are_rejected():
    with pytest.raises(UserError, match="teacher_logit"):
        make(teacher_logit="median")
    with pytest.raises(UserError, match="unknown config key 'method_args.tau'"):
        make(tau=1.0)
    with pytest.raises(UserError, match="teachers_run"):
        make("cmtkd-frozen")
    with pytest.raises(UserError, match="fixes method_args.beta"):
        make("cmtkd-noml", beta=0.3)


# ------------------------------------------------------------------------- end to end, resume
def _train_cmd(out, epochs=3, method="cmtkd"):
    # AlexNet: resuming is architecture-agnostic, and it trains 3-4x faster than ResNet-18 on the CPU.
    return [sys.executable, "-m", "cmtkd.cli", "train", "--method", method, "--arch", "alexnet",
            "--dataset", "digits", "--epochs", str(epochs), "--seed", "3", "--threads", "1",
            "--set", "model.width=0.125", "--set", "data.batch_size=512", "--set", "data.val_fraction=0.1",
            "--set", "method_args.teacher_bits=[8,4]", "--out", str(out)]


@pytest.mark.slow
def test_cmtkd_exact_resume_after_sigkill(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_train_cmd(ref), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None, "training ended before the first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"
    subprocess.run(_train_cmd(killed), check=True, env=env, capture_output=True)

    from cmtkd.checkpoint import read_content

    a = read_content(ref / "checkpoint.pt")
    b = read_content(killed / "checkpoint.pt")
    assert a["method"].keys() == b["method"].keys()
    assert any(k.startswith("teachers.") for k in a["method"]) and "importance_logits" in a["method"]
    for k in a["method"]:
        assert torch.equal(a["method"][k], b["method"][k]), k
    assert not torch.equal(a["method"]["importance_logits"], torch.zeros(3, 2)), "theta never moved"
    ma = read_content(ref / "model.pt")["state_dict"]
    mb = read_content(killed / "model.pt")["state_dict"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    # the student alone was kept: no teacher weights in model.pt
    assert not any(k.startswith("teachers") for k in ma)


# --------------------------------------------------------------------- pre-trained teachers
def _teacher_file(folder, bits, arch="resnet18"):
    from cmtkd.checkpoint import save_model
    from cmtkd.models import build_model

    cfg = dict(arch=arch, num_classes=10, in_channels=1, variant="cifar", width=0.125, w_bits=bits, a_bits=bits,
               policy="fp-first-last", weight_quant="auto", act_quant="hwgq", quant_layout="conv-inputs")
    path = folder / f"t{bits}.pt"
    save_model(path, arch_config=cfg, state_dict=build_model(**cfg).state_dict(), method="qat",
               selected_epoch=1, config_hash="test")
    return str(path)


def _teachers_only_file(folder, bits=(8, 6, 4), arch="resnet18", seed=0, **args):
    """The model.pt a teachers-only run (cmtkd-teachers) writes, of an untrained (random theta) set."""
    from cmtkd.checkpoint import save_model

    m = make("cmtkd-teachers", seed=seed, arch=arch, teacher_bits=list(bits), theta_init="random", **args)
    path = folder / "teachers" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, arch_config=m.student_arch_config(), state_dict=m.student.state_dict(), method="cmtkd-teachers",
               selected_epoch=1, config_hash="test")
    return path, m


def test_teachers_only_stage_trains_teachers_and_theta_without_a_student():
    m = make("cmtkd-teachers", teacher_bits=[8, 4])
    assert (m.cfg.w_bits, m.cfg.a_bits) == (32, 32)
    assert not hasattr(m, "teachers") and len(m.student.teachers) == 2  # the fused set is the "student"
    opt = build_optimizer(m, m.cfg)
    assert {g["name"] for g in opt.param_groups} == {"teacher0_w8a8", "teacher1_w4a4", "importance_logits"}
    before = {k: v.clone() for k, v in m.student.state_dict().items()}
    m.train()
    images, targets = batch()
    logits, losses = m.forward_train(images, targets)
    assert set(losses) == {"ce_teachers"}  # CE_T only: KL_T and the feature loss need a student
    assert torch.equal(logits, m.student(images))  # z_T, the same forward evaluation uses
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    after = m.student.state_dict()
    assert not torch.equal(before["importance_logits"], after["importance_logits"])
    for i in range(2):
        assert not torch.equal(before[f"teachers.{i}.stages.stem.0.weight"], after[f"teachers.{i}.stages.stem.0.weight"])
    with pytest.raises(UserError, match="trains no student"):
        make("cmtkd-teachers", w_bits=2)


def test_frozen_teachers_and_theta_come_from_the_teachers_only_run_and_stay_fixed(tmp_path):
    path, source = _teachers_only_file(tmp_path)
    m = make("cmtkd-frozen", teachers_run=str(path.parent))
    src = source.student.state_dict()
    assert all(torch.equal(v, src[f"teachers.{k}"]) for k, v in m.teachers.state_dict().items())
    assert torch.equal(m.importance_logits, src["importance_logits"]) and not m.importance_logits.requires_grad
    opt = build_optimizer(m, m.cfg)
    assert {g["name"] for g in opt.param_groups} == {"student"}  # no teacher, no theta group
    before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("student.")}
    student = {k: v.clone() for k, v in m.student.state_dict().items()}
    m.train()
    assert not any(t.training for t in m.teachers)  # eval-mode BN: statistics stay as loaded
    images, targets = batch()
    _, losses = m.forward_train(images, targets)
    assert set(losses) == {"ce_student", "kl_student", "feat"}  # the teacher side trains nothing
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # teachers (BN stats too) and theta
    assert not all(torch.equal(student[k], m.student.state_dict()[k]) for k in student)
    m.eval()
    torch.testing.assert_close(m.eval_models()["teachers"](images), source.student.eval()(images), rtol=0, atol=0)
    from cmtkd.engine.io import sha256_file

    assert m.metadata()["teachers_run_sha256"] == sha256_file(path)


def test_frozen_refuses_independent_teachers(tmp_path):
    """The old cmtkd-frozen fused n independently trained qat teachers (chance-level fused teachers):
    neither per-teacher checkpoints nor a one-network run are accepted as its teachers."""
    paths = [_teacher_file(tmp_path, b) for b in (8, 6, 4)]
    with pytest.raises(UserError, match="teacher_checkpoints"):
        make("cmtkd-frozen", teacher_checkpoints=paths)
    with pytest.raises(UserError, match="holds one network.*cmtkd-teachers"):
        make("cmtkd-frozen", teachers_run=paths[0])


@pytest.mark.parametrize("change, needle", [
    ({"teacher_bits": [8, 4]}, r"teacher bits \[8, 6, 4\], this run \[8, 4\]"),
    ({"fusion_points": ["layer2"]}, "fusion_points"),
    ({"arch": "alexnet"}, "arch"),
])
def test_frozen_refuses_a_teachers_only_run_of_other_teachers(tmp_path, change, needle):
    path, _ = _teachers_only_file(tmp_path)
    with pytest.raises(UserError, match=needle):
        make("cmtkd-frozen", teachers_run=str(path), **change)


def test_teachers_only_model_file_is_not_one_network(tmp_path):
    from cmtkd.teachers import load_teacher

    path, _ = _teachers_only_file(tmp_path, bits=(8, 4))
    with pytest.raises(UserError, match="2 fused teachers of a teachers-only run.*method_args.teachers_run"):
        load_teacher(path, arch="resnet18", num_classes=10)


FROZEN_TINY = ["--arch", "alexnet", "--dataset", "digits", "--threads", "1", "--set", "model.width=0.0625",
               "--set", "data.batch_size=256", "--set", "train.progress=none", "--set", "method_args.teacher_bits=[8,4]"]


@pytest.mark.slow
def test_frozen_fused_teachers_keep_the_accuracy_of_their_own_training(tmp_path):
    """A teachers-only run, then cmtkd-frozen on it: the fused teachers the frozen run evaluates every
    epoch have exactly the validation accuracy their teachers-only run selected them with, and exactly
    its test accuracy (the old cmtkd-frozen fused independent teachers that fell to chance)."""
    import json

    import pandas as pd

    from conftest import run_cli

    teachers, frozen = tmp_path / "teachers", tmp_path / "frozen"
    done = run_cli("train", "--method", "cmtkd-teachers", "--epochs", "2", "--seed", "0", *FROZEN_TINY,
                   "--out", str(teachers))
    assert done.returncode == 0, done.stderr
    done = run_cli("train", "--method", "cmtkd-frozen", "--epochs", "2", "--seed", "0", *FROZEN_TINY,
                   "--set", f"method_args.teachers_run={teachers}", "--out", str(frozen))
    assert done.returncode == 0, done.stderr
    stage = pd.read_csv(teachers / "history.csv")
    stage_metrics = json.loads((teachers / "metrics.json").read_text())
    selected = stage.set_index("epoch").loc[stage_metrics["best_val_epoch"]]
    history = pd.read_csv(frozen / "history.csv")
    assert len(history) == 2
    assert (history["val_top1_teachers"] == selected["val_top1_student"]).all()  # exactly, every epoch
    for head in ("teacher0_w8a8", "teacher1_w4a4"):
        assert (history[f"val_top1_{head}"] == selected[f"val_top1_{head}"]).all()
    assert selected["val_top1_student"] > 50  # 10 classes: chance is 10 %
    assert "loss_ce_teachers" not in history and "loss_kl_teachers" not in history
    # the test split: the frozen run's teachers (rebuilt as that run built them) vs the stage's own evaluation
    from cmtkd.checkpoint import read_content
    from cmtkd.config import load_run_config
    from cmtkd.data import build_data
    from cmtkd.engine.trainer import evaluate_model

    cfg = load_run_config(frozen)
    data = build_data(cfg.data, torch.device("cpu"))
    method = get_method(cfg.method)(cfg, data.info)
    method.load_state_dict(read_content(frozen / "checkpoint.pt")["method"])
    test = evaluate_model(method.eval_models()["teachers"], data.eval_batches("test"), cfg, torch.device("cpu"))
    assert test["top1"] == stage_metrics["top1"]
    assert json.loads((frozen / "metrics.json").read_text())["teachers_run"] == str((teachers / "model.pt").resolve())
    # cmtkd evaluate rebuilds the stage's fused teachers from its model.pt: the same number again
    done = run_cli("evaluate", str(teachers), "--threads", "1")
    assert done.returncode == 0 and json.loads((teachers / "eval.json").read_text())["top1"] == stage_metrics["top1"]


def test_teacher_init_from_one_checkpoint_is_broadcast_and_trained(tmp_path):
    path = _teacher_file(tmp_path, 32)
    m = make(teacher_init="checkpoints", teacher_checkpoints=[path])
    from cmtkd.checkpoint import read_content

    src = read_content(path)["state_dict"]
    for t in m.teachers:
        assert torch.equal(t.stages["stem"][0].weight, src["stages.stem.0.weight"])
    assert all(p.requires_grad for p in m.teachers.parameters())


def test_teacher_checkpoint_with_other_layout_is_rejected(tmp_path):
    # AlexNet's two layouts have the same parameter names, so only the layout check catches this
    from cmtkd import checkpoint
    from cmtkd.models import build_model

    config = dict(arch="alexnet", num_classes=10, in_channels=1, variant="cifar", width=0.125, w_bits=8,
                  a_bits=8, policy="fp-first-last", weight_quant="auto", act_quant="hwgq",
                  quant_layout="block-outputs")
    checkpoint.save_model(tmp_path / "model.pt", arch_config=config, state_dict=build_model(**config).state_dict(),
                          method="qat", selected_epoch=1, config_hash="0" * 64)
    with pytest.raises(UserError, match="quant_layout"):
        make(arch="alexnet", teacher_bits=[8], teacher_init="checkpoints",
             teacher_checkpoints=[str(tmp_path / "model.pt")])
