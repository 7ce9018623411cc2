"""CMT-KD's readings of Eq. 1 (ledger A5, A19, A20): what is fused (``fusion_input``), whether each
teacher re-quantizes the mixture (``requantize_fused``), and which losses reach theta (``theta_from``).
Golden values on a tiny ResNet-18: shapes, the tensors that reach each teacher's conv and downsample,
the student's own feature, and gradients into theta."""
from __future__ import annotations

import pytest
import torch

from cmtkd.config import build_config, config_hash
from cmtkd.errors import UserError
from cmtkd.methods.cmtkd import read_unit_input, run_from_input
from cmtkd.registry import get_method
from test_cmtkd import INFO, _one_thread, batch, make, on_grid  # noqa: F401  (_one_thread: autouse fixture)


def stage_inputs(m, images):
    """Independently of CMT-KD's forward (eval mode): each teacher's layer1 output A_i and what its
    layer2 reads of it, quant1_i(bn0_i(A_i)); layer1 is the first fusion point, so nothing is fused before."""
    outs = [t.stages["layer1"](t.stages["stem"](images)) for t in m.teachers]
    reads = [t.stages["layer2"][0].quant1(t.stages["layer2"][0].bn0(a)) for t, a in zip(m.teachers, outs)]
    return outs, reads


def record_inputs(modules):
    seen = {}
    hooks = [mod.register_forward_pre_hook(lambda _m, inp, i=i: seen.setdefault(i, []).append(inp[0]))
             for i, mod in enumerate(modules)]
    return seen, hooks


def test_stage_input_fuses_what_each_teachers_next_stage_reads_and_feeds_both_paths():
    m = make(fusion_input="stage-input", teacher_bits=[8, 4], theta_init="random")
    m.eval()
    images, _ = batch()
    with torch.no_grad():
        m.importance_logits.normal_(0.0, 1.0)
        outs, reads = stage_inputs(m, images)
        blocks = [t.stages["layer2"][0] for t in m.teachers]
        convs, conv_hooks = record_inputs([b.conv1 for b in blocks])
        downs, down_hooks = record_inputs([b.downsample[1] for b in blocks])  # the 1x1 conv
        acts, act_hooks = record_inputs([b.downsample[0] for b in blocks])  # its own quantizer: skipped
        _, shared, student_feats, z_s, parts = m.teachers_forward(images, m._units(m.student))
        for h in conv_hooks + down_hooks + act_hooks:
            h.remove()
        pi = m.importance()[0]
    expected = pi[0] * reads[0] + pi[1] * reads[1]
    assert shared["layer1"].shape == outs[0].shape == (8, 8, 28, 28)
    torch.testing.assert_close(shared["layer1"], expected)
    assert (shared["layer1"] >= 0).all() and not (outs[0] >= 0).all()  # normalised, quantized; A is signed
    for i in range(2):
        assert convs[i][0] is shared["layer1"] and downs[i][0] is shared["layer1"]
        torch.testing.assert_close(parts["layer1"][i], reads[i])
        assert on_grid(parts["layer1"][i], (8, 4)[i])
    assert acts == {}
    # the student's attention feature is its own layer2 input, quant1(bn0(S)) on its 2-bit grid
    s_block = m.student.stages["layer2"][0]
    s_out = m.student.stages["layer1"](m.student.stages["stem"](images))
    torch.testing.assert_close(student_feats["layer1"], s_block.quant1(s_block.bn0(s_out)))
    assert on_grid(student_feats["layer1"], 2)
    assert torch.equal(z_s, m.student(images))  # the student's network is untouched


def test_one_hot_theta_gives_each_teachers_own_stage_input():
    m = make(fusion_input="stage-input", teacher_bits=[8, 4])
    m.eval()
    images, _ = batch()
    with torch.no_grad():
        _, reads = stage_inputs(m, images)
        for i, bits in enumerate((8, 4)):
            m.importance_logits.zero_()
            m.importance_logits[:, i] = 1e4
            shared = m.teachers_forward(images)[1]
            assert on_grid(shared["layer1"], bits)
            torch.testing.assert_close(shared["layer1"], reads[i])


def test_requantize_fused_hands_each_teacher_the_mixture_on_its_own_grid():
    for reading in ("residual", "stage-input"):
        m = make(fusion_input=reading, requantize_fused=True, teacher_bits=[8, 4], theta_init="random")
        m.eval()
        images, _ = batch()
        target = [t.stages["layer2"][0].conv1 if reading == "stage-input" else t.stages["layer2"] for t in m.teachers]
        seen, hooks = record_inputs(target)
        with torch.no_grad():
            m.importance_logits.normal_(0.0, 1.0)
            shared = m.teachers_forward(images)[1]
        for h in hooks:
            h.remove()
        for i, q in enumerate(m.fusion_quantizers):
            torch.testing.assert_close(seen[i][0], q(shared["layer1"]))
        assert not torch.equal(seen[0][0], seen[1][0])


def test_split_unit_is_the_unit():
    m = make(teacher_bits=[8])
    m.eval()
    x = torch.randn(4, 8, 28, 28)
    with torch.no_grad():
        for name in ("layer2", "head"):
            unit = m.student.stages[name]
            inp = x if name == "layer2" else m.student.stages["layer4"](m.student.stages["layer3"](
                m.student.stages["layer2"](x)))
            assert torch.equal(run_from_input(unit, *read_unit_input(unit, inp)), unit(inp))


@pytest.mark.parametrize("theta_from", ["teachers", "all"])
@pytest.mark.parametrize("reading", ["residual", "stage-input"])
def test_which_losses_reach_theta(reading, theta_from):
    m = make(fusion_input=reading, theta_from=theta_from, teacher_bits=[8, 4])
    m.train()
    images, targets = batch()
    _, losses = m.forward_train(images, targets)
    losses["feat"].backward(retain_graph=True)  # the student's feature loss alone
    grad = m.importance_logits.grad
    if theta_from == "all":
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None or not grad.any()
    # the student's feature loss never reaches the teachers' weights (detach_shared)
    assert all(p.grad is None or not p.grad.any() for p in m.teachers.parameters())
    assert any(p.grad is not None and p.grad.any() for p in m.student.parameters())
    m.zero_grad(set_to_none=True)
    (losses["ce_teachers"] + losses["kl_teachers"]).backward()  # the teachers' losses reach theta either way
    assert m.importance_logits.grad.abs().sum() > 0


def test_stage_input_refuses_a_fusion_point_before_an_identity_block():
    with pytest.raises(UserError, match="identity shortcut"):
        make(fusion_input="stage-input", fusion_points=["blocks"])
    with pytest.raises(UserError, match="fusion_input"):
        make(fusion_input="sum")
    with pytest.raises(UserError, match="theta_from=all"):
        make("cmtkd-avg", theta_from="all")
    make(fusion_input="stage-input", fusion_points=["stage-ends+last"])  # layer4 -> the head: fine


def test_alexnet_stage_input_is_the_residual_reading():
    # AlexNet's stage outputs already end in the teacher's quantizer (+ max-pool): both readings fuse
    # the same tensors, and HWGQ is idempotent on its own grid
    shared = []
    for reading in ("residual", "stage-input"):
        m = make(arch="alexnet", fusion_input=reading, teacher_bits=[8, 4], seed=3)
        m.eval()
        with torch.no_grad():
            shared.append(m.teachers_forward(batch()[0], m._units(m.student))[1:3])
    for key in ("conv2", "conv3", "conv4"):
        torch.testing.assert_close(shared[0][0][key], shared[1][0][key])
        torch.testing.assert_close(shared[0][1][key], shared[1][1][key])


def test_new_options_at_their_defaults_keep_every_config_hash():
    cfg = build_config([{"method": "cmtkd", "arch": "resnet18"}])
    old = {**cfg.method_args}
    for key in ("fusion_input", "theta_from", "requantize_fused"):
        old.pop(key)
    as_before = build_config([{"method": "cmtkd", "arch": "resnet18"}])
    as_before.method_args = old
    assert config_hash(cfg) == config_hash(as_before)
    other = build_config([{"method": "cmtkd", "arch": "resnet18", "method_args": {"fusion_input": "stage-input"}}])
    assert config_hash(other) != config_hash(cfg)


def test_teachers_stage_records_its_reading_and_frozen_refuses_another(tmp_path):
    from cmtkd import checkpoint

    cfg = build_config([{"method": "cmtkd-teachers", "arch": "resnet18", "model": {"width": 0.125},
                         "method_args": {"teacher_bits": [8, 4], "fusion_input": "stage-input"}}])
    stage = get_method("cmtkd-teachers")(cfg, INFO)
    arch = stage.student_arch_config()
    assert arch["fusion_input"] == "stage-input"
    assert "requantize_fused" not in arch  # only what differs from the defaults
    default = get_method("cmtkd-teachers")(build_config([{"method": "cmtkd-teachers", "arch": "resnet18",
                                                          "model": {"width": 0.125},
                                                          "method_args": {"teacher_bits": [8, 4]}}]), INFO)
    assert "fusion_input" not in default.student_arch_config()
    run = tmp_path / "stage"
    run.mkdir()
    checkpoint.save_model(run / "model.pt", arch_config=arch, state_dict=stage.student.state_dict(),
                          method="cmtkd-teachers", selected_epoch=1, config_hash=config_hash(cfg))
    frozen = make("cmtkd-frozen", teacher_bits=[8, 4], teachers_run=str(run), fusion_input="stage-input")
    assert frozen.fusion_input == "stage-input"
    with pytest.raises(UserError, match="fusion_input"):
        make("cmtkd-frozen", teacher_bits=[8, 4], teachers_run=str(run))
