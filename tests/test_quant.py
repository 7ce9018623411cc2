"""Property-based tests of cmtkd.quant (in the style of brevitas): random shapes and scales, outputs on
the grid, at most 2^b levels, idempotence, straight-through gradients, plus a few golden values."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cmtkd.errors import UserError
from cmtkd.quant import (
    ACT_QUANTIZERS,
    FULL_PRECISION,
    GAUSSIAN_WEIGHT_SCALES,
    HWGQ,
    HWGQ_STEPS,
    PACT,
    WEIGHT_QUANTIZERS,
    BinaryWeight,
    DoReFaActivation,
    DoReFaWeight,
    GaussianWeight,
    LSQActivation,
    LSQWeight,
    QConv2d,
    QLinear,
    check_bits,
    gaussian_quantize,
    gaussian_scale,
    make_act_quantizer,
    make_weight_quantizer,
)

torch.set_num_threads(1)

SETTINGS = settings(max_examples=30, deadline=None)
BITS = st.integers(min_value=1, max_value=8)
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
SCALES = st.floats(min_value=0.01, max_value=10.0)
ACT_SHAPES = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)
WEIGHT_SHAPES = st.one_of(
    st.tuples(st.integers(1, 6), st.integers(1, 6)),  # linear OI
    st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),  # conv OIHW
)


def randn(shape, seed, scale=1.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * scale + shift


# ---------------------------------------------------------------------------------------------
# Activation quantizers


def act_grid(quantizer) -> tuple[float, float]:
    """(step, clip) of an activation quantizer's grid: levels are k * step, 0 <= k * step <= clip."""
    n = 2**quantizer.bits - 1
    if isinstance(quantizer, HWGQ):
        return quantizer.step, quantizer.clip
    if isinstance(quantizer, PACT):
        alpha = quantizer.alpha.item()
        return alpha / n, alpha
    if isinstance(quantizer, LSQActivation):
        step = quantizer.step.item()
        return step, step * n
    assert isinstance(quantizer, DoReFaActivation)
    return 1.0 / n, 1.0


def make_act(name, bits, x, alpha):
    quantizer = make_act_quantizer(name, bits)
    if name == "pact":
        with torch.no_grad():
            quantizer.alpha.fill_(alpha)
    if name == "lsq":
        quantizer(x)  # lazy step initialisation from this batch
    return quantizer


@SETTINGS
@given(name=st.sampled_from(ACT_QUANTIZERS), bits=BITS, shape=ACT_SHAPES, seed=SEEDS, scale=SCALES,
       alpha=st.floats(0.1, 5.0))
def test_activation_levels_grid_idempotent(name, bits, shape, seed, scale, alpha):
    x = randn(shape, seed, scale, shift=0.3 * scale)
    quantizer = make_act(name, bits, x, alpha)
    assert quantizer.bits == bits
    y = quantizer(x)
    assert y.shape == x.shape
    assert (y >= 0).all()
    assert y.unique().numel() <= 2**bits
    step, clip = act_grid(quantizer)
    k = y / step
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert (k.round() >= 0).all() and (k.round() <= 2**bits - 1).all()
    assert (y <= clip * (1 + 1e-6)).all()
    assert torch.equal(quantizer(y), y)  # exactly idempotent


@SETTINGS
@given(name=st.sampled_from(ACT_QUANTIZERS), bits=BITS, shape=ACT_SHAPES, seed=SEEDS, scale=SCALES,
       alpha=st.floats(0.1, 5.0))
def test_activation_straight_through_gradient(name, bits, shape, seed, scale, alpha):
    x = randn(shape, seed, scale, shift=0.3 * scale)
    quantizer = make_act(name, bits, x, alpha)
    _, clip = act_grid(quantizer)
    x.requires_grad_(True)
    quantizer(x).sum().backward()
    inside = (x > 0) & (x < clip)
    outside = (x < 0) | (x > clip)
    # LSQ computes round(x / s) * s, so its in-range gradient is s / s: 1 up to rounding.
    assert torch.allclose(x.grad[inside], torch.ones_like(x.grad[inside]), rtol=1e-6, atol=0)
    assert torch.equal(x.grad[outside], torch.zeros_like(x.grad[outside]))


@pytest.mark.parametrize("bits", range(1, 9))
def test_activation_uses_all_levels_on_a_ramp(bits):
    for name in ACT_QUANTIZERS:
        quantizer = make_act(name, bits, torch.linspace(0.0, 3.0, 100), alpha=2.0)
        _, clip = act_grid(quantizer)
        ramp = torch.linspace(-1.0, 1.5 * clip, 20001)
        assert quantizer(ramp).unique().numel() == 2**bits, name


def test_hwgq_2bit_golden_levels():
    quantizer = make_act_quantizer("hwgq", 2)
    levels = quantizer(torch.linspace(-2.0, 4.0, 6001)).unique()
    assert torch.allclose(levels, torch.tensor([0.0, 0.538, 1.076, 1.614]), atol=1e-6, rtol=0)
    assert HWGQ_STEPS[2] == 0.538 and quantizer.clip == pytest.approx(1.614)


def test_hwgq_rounds_to_nearest_level():
    quantizer = make_act_quantizer("hwgq", 2)
    x = torch.tensor([-0.5, 0.0, 0.26, 0.28, 0.538, 0.9, 1.5, 1.614, 9.0])
    expected = torch.tensor([0.0, 0.0, 0.0, 0.538, 0.538, 1.076, 1.614, 1.614, 1.614])
    assert torch.allclose(quantizer(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_hwgq_is_bit_for_bit_its_straight_through_formulation(bits):
    """HWGQ runs as one autograd node (_ClippedRound, for eager speed); values, codes and gradients must be
    bit for bit those of the plain straight-through formulation it replaced (which produced the committed
    results), at the boundaries, on both sides of the clip, for negative gradients and infinities; for NaN the
    values only (the gradient of a NaN input is hardtanh's backward's: 0 or passed through, by code path)."""
    from cmtkd.quant.common import straight_through

    quantizer = make_act_quantizer("hwgq", bits)
    step, clip = quantizer.step, quantizer.clip
    generator = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.randn(4000, generator=generator) * clip, torch.tensor([0.0, -0.0, clip, step / 2, -1e-8,
                   clip + 1e-6, float("nan"), float("inf"), -float("inf")]),
                   torch.arange(0, 2**bits) * step + step / 2])  # exact half-steps: round-half-to-even
    upstream = torch.randn(x.shape, generator=generator)

    class Clamp(torch.autograd.Function):
        """``t.clamp(0, clip)`` with the gradient torch 2.14's clamp has (the committed results' torch): zero
        outside the open interval (0, clip), +0.0 there. torch 2.11's clamp passes the gradient at exactly 0
        and the clip, so the plain formulation's gradient depends on the torch version; HWGQ's must not."""

        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t.clamp(0.0, clip)

        @staticmethod
        def backward(ctx, grad):
            (t,) = ctx.saved_tensors
            return torch.where((t > 0.0) & (t < clip), grad, torch.zeros_like(grad))

    def reference(t, codes):
        if codes:
            scaled = Clamp.apply(t) / step
            return straight_through(scaled, torch.round(scaled))
        clipped = Clamp.apply(t)
        return straight_through(clipped, torch.round(clipped / step) * step)

    def bits_of(t):
        return t.view(torch.int32)

    for codes in (False, True):
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ours = quantizer.grid(a).codes if codes else quantizer(a)
        theirs = reference(b, codes)
        (ours * upstream).sum().backward()
        (theirs * upstream).sum().backward()
        assert torch.equal(bits_of(ours.detach()), bits_of(theirs.detach())), codes
        finite = ~x.isnan()
        assert torch.equal(bits_of(a.grad[finite]), bits_of(b.grad[finite])), codes


def test_pact_alpha_gradient_counts_clipped_inputs():
    quantizer = make_act_quantizer("pact", 2)
    assert quantizer.alpha.item() == 10.0
    with torch.no_grad():
        quantizer.alpha.fill_(1.0)
    x = torch.tensor([-1.0, 0.2, 0.5, 0.99, 1.0, 1.5, 3.0], requires_grad=True)
    quantizer(x).sum().backward()
    assert quantizer.alpha.grad.item() == 3.0  # x >= alpha: 1.0, 1.5, 3.0
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))


@SETTINGS
@given(bits=BITS, shape=ACT_SHAPES, seed=SEEDS, scale=SCALES)
def test_lsq_activation_init_and_step_gradient(bits, shape, seed, scale):
    qp = 2**bits - 1
    x = randn(shape, seed, scale, shift=0.3 * scale)
    quantizer = LSQActivation(bits)
    assert not quantizer.initialized
    quantizer(x)
    assert quantizer.initialized
    expected_step = (2 * x.abs().mean() / math.sqrt(qp)).clamp_min(1e-8)
    assert torch.allclose(quantizer.step.detach(), expected_step)
    quantizer(x * 7.0 + 1.0)  # a second batch must not re-initialise
    assert torch.allclose(quantizer.step.detach(), expected_step)

    quantizer(x).sum().backward()
    step = quantizer.step.detach()
    z = x / step
    per_element = torch.where(z >= qp, torch.full_like(z, qp), torch.where(z <= 0, 0.0, z.round() - z))
    expected_grad = per_element.sum() / math.sqrt(x.numel() * qp)
    assert torch.allclose(quantizer.step.grad, expected_grad, atol=1e-4, rtol=1e-4)


def test_full_precision_activation_is_relu():
    for name in ACT_QUANTIZERS:
        quantizer = make_act_quantizer(name, FULL_PRECISION)
        assert isinstance(quantizer, nn.ReLU) and quantizer.bits == 32
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
        assert torch.equal(quantizer(x), F.relu(x))


# ---------------------------------------------------------------------------------------------
# Weight quantizers

WEIGHT_CASES = st.one_of(
    st.tuples(st.just("binary"), st.just(1)),
    st.tuples(st.sampled_from(["auto", "gaussian", "dorefa"]), BITS),
    st.tuples(st.just("lsq"), st.integers(2, 8)),
)


def weight_levels_ok(quantizer, weight, w_q):
    """Check the levels/grid property of each weight quantizer; return nothing, assert instead."""
    bits = quantizer.bits
    if isinstance(quantizer, BinaryWeight):
        scale = weight.abs().reshape(weight.shape[0], -1).mean(dim=1)
        per_channel = w_q.reshape(weight.shape[0], -1)
        for channel, magnitude in zip(per_channel, scale):
            assert channel.unique().numel() <= 2
            assert torch.allclose(channel.abs(), magnitude.expand_as(channel))
        assert torch.equal(w_q >= 0, weight >= 0)  # sign(0) = +1
    elif isinstance(quantizer, GaussianWeight):
        assert w_q.unique().numel() <= 2**bits
        step = gaussian_scale(weight, bits)
        k = w_q / step + 0.5  # levels are (k - 0.5) * step
        assert torch.allclose(k, k.round(), atol=1e-3)
        assert (k.round().abs() <= 2 ** (bits - 1)).all() and (k.round() >= -(2 ** (bits - 1)) + 1).all()
    elif isinstance(quantizer, LSQWeight):
        assert w_q.unique().numel() <= 2**bits
        k = w_q / quantizer.step.detach()
        assert torch.allclose(k, k.round(), atol=1e-4)
        assert (k.round() >= -(2 ** (bits - 1))).all() and (k.round() <= 2 ** (bits - 1) - 1).all()
    else:
        assert isinstance(quantizer, DoReFaWeight)
        assert w_q.unique().numel() <= 2**bits
        if bits == 1:
            assert torch.allclose(w_q.abs(), weight.abs().mean().expand_as(w_q))
        else:
            n = 2**bits - 1
            k = (w_q + 1) / 2 * n
            assert torch.allclose(k, k.round(), atol=1e-4)
            assert (w_q >= -1 - 1e-6).all() and (w_q <= 1 + 1e-6).all()


@SETTINGS
@given(case=WEIGHT_CASES, shape=WEIGHT_SHAPES, seed=SEEDS, scale=SCALES)
def test_weight_levels_and_grid(case, shape, seed, scale):
    name, bits = case
    weight = randn(shape, seed, scale)
    quantizer = make_weight_quantizer(name, bits)
    assert quantizer.bits == bits
    if name == "auto":
        assert isinstance(quantizer, BinaryWeight if bits == 1 else GaussianWeight)
    w_q = quantizer(weight)
    assert w_q.shape == weight.shape
    weight_levels_ok(quantizer, weight, w_q)


@SETTINGS
@given(case=WEIGHT_CASES, shape=WEIGHT_SHAPES, seed=SEEDS, scale=SCALES)
def test_weight_straight_through_gradient(case, shape, seed, scale):
    name, bits = case
    weight = randn(shape, seed, scale).requires_grad_(True)
    quantizer = make_weight_quantizer(name, bits)
    upstream = randn(shape, seed + 1)
    (quantizer(weight) * upstream).sum().backward()
    if isinstance(quantizer, (BinaryWeight, GaussianWeight)) or (name == "dorefa" and bits == 1):
        assert torch.equal(weight.grad, upstream)  # identity straight-through
    elif isinstance(quantizer, LSQWeight):
        step = quantizer.step.item()
        inside = (weight > -quantizer.qn * step) & (weight < quantizer.qp * step)
        outside = (weight < -quantizer.qn * step) | (weight > quantizer.qp * step)
        assert torch.allclose(weight.grad[inside], upstream[inside])  # (x / s) * s: up to rounding
        assert torch.equal(weight.grad[outside], torch.zeros_like(upstream[outside]))
    else:  # DoReFa b > 1: straight through the round, differentiate the tanh normalisation
        reference = weight.detach().clone().requires_grad_(True)
        squashed = torch.tanh(reference)
        (2 * (squashed / (2 * squashed.abs().max()) + 0.5) - 1).mul(upstream).sum().backward()
        assert torch.allclose(weight.grad, reference.grad, atol=1e-6)


@SETTINGS
@given(shape=WEIGHT_SHAPES, seed=SEEDS, scale=SCALES)
def test_binary_weight_idempotent_and_two_levels(shape, seed, scale):
    weight = randn(shape, seed, scale)
    weight[0].view(-1)[0] = 0.0  # sign(0) must be +1, not a third level
    quantizer = make_weight_quantizer("binary", 1)
    w_q = quantizer(weight)
    assert w_q[0].view(-1)[0] > 0 or weight[0].abs().sum() == 0
    for channel in w_q.reshape(shape[0], -1):
        assert channel.unique().numel() <= 2
    assert torch.allclose(quantizer(w_q), w_q, rtol=1e-6, atol=0)


@SETTINGS
@given(bits=BITS, shape=WEIGHT_SHAPES, seed=SEEDS, scale=SCALES)
def test_gaussian_fixed_scale_idempotent(bits, shape, seed, scale):
    weight = randn(shape, seed, scale)
    step = gaussian_scale(weight, bits)
    w_q = gaussian_quantize(weight, step, bits)
    assert torch.equal(gaussian_quantize(w_q, step, bits), w_q)
    assert torch.equal(GaussianWeight(bits)(weight), w_q)


def test_gaussian_2bit_golden_levels():
    weight = torch.linspace(-3.0, 3.0, 601)
    step = GAUSSIAN_WEIGHT_SCALES[2] * weight.std()
    levels = make_weight_quantizer("gaussian", 2)(weight).unique()
    assert torch.allclose(levels, torch.tensor([-1.5, -0.5, 0.5, 1.5]) * step, atol=1e-6, rtol=0)


@SETTINGS
@given(bits=st.integers(2, 8), shape=WEIGHT_SHAPES, seed=SEEDS, scale=SCALES)
def test_lsq_weight_init_and_fixed_step_idempotent(bits, shape, seed, scale):
    weight = randn(shape, seed, scale)
    quantizer = LSQWeight(bits)
    w_q = quantizer(weight)
    expected_step = 2 * weight.abs().mean() / math.sqrt(2 ** (bits - 1) - 1)
    assert torch.allclose(quantizer.step.detach(), expected_step)
    assert torch.equal(quantizer(w_q), w_q)


def test_full_precision_weight_is_identity():
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for name in WEIGHT_QUANTIZERS:
        quantizer = make_weight_quantizer(name, FULL_PRECISION)
        assert isinstance(quantizer, nn.Identity) and quantizer.bits == 32
        assert quantizer(weight) is weight


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("bits", [0, 9, 16, -1, 33, 2.0, "2", None, True])
def test_bad_bits_raise_user_error(bits):
    with pytest.raises(UserError, match="bit"):
        check_bits(bits)
    with pytest.raises(UserError):
        make_act_quantizer("hwgq", bits)
    with pytest.raises(UserError):
        make_weight_quantizer("auto", bits)
    with pytest.raises(UserError):
        QConv2d(3, 4, 3, w_bits=bits)


@pytest.mark.parametrize("bits", [*range(1, 9), 32])
def test_good_bits_accepted(bits):
    assert check_bits(bits) == bits


@pytest.mark.parametrize("name", ["HWGQ", "relu", "", "lsq2", None])
def test_unknown_names_raise_user_error(name):
    with pytest.raises(UserError, match="hwgq"):
        make_act_quantizer(name, 2)
    with pytest.raises(UserError, match="gaussian"):
        make_weight_quantizer(name, 2)
    with pytest.raises(UserError):
        QLinear(3, 4, w_bits=32, weight_quant=name)


def test_unsupported_bit_combinations_raise_user_error():
    with pytest.raises(UserError, match=">=2 bits"):
        make_weight_quantizer("lsq", 1)
    for bits in (2, 4, 8):
        with pytest.raises(UserError, match="bits=1"):
            make_weight_quantizer("binary", bits)
    for cls in (HWGQ, PACT, LSQActivation, DoReFaActivation, GaussianWeight, LSQWeight, DoReFaWeight):
        with pytest.raises(UserError):
            cls(32)


def test_error_messages_are_one_line():
    for call in (lambda: check_bits(9), lambda: make_act_quantizer("nope", 2),
                 lambda: make_weight_quantizer("lsq", 1), lambda: make_weight_quantizer("binary", 2)):
        with pytest.raises(UserError) as info:
            call()
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Layers


@pytest.mark.parametrize("kwargs", [
    dict(stride=1, padding=1, bias=True),
    dict(stride=2, padding=0, bias=False),
    dict(stride=1, padding=1, groups=2, bias=True, padding_mode="reflect"),
])
def test_qconv2d_full_precision_matches_conv2d(kwargs):
    torch.manual_seed(0)
    reference = nn.Conv2d(4, 6, 3, **kwargs)
    layer = QConv2d(4, 6, 3, **kwargs)  # default w_bits=32
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize("bias", [True, False])
def test_qlinear_full_precision_matches_linear(bias):
    torch.manual_seed(0)
    reference = nn.Linear(5, 3, bias=bias)
    layer = QLinear(5, 3, bias=bias, w_bits=32, weight_quant="gaussian")
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(4, 5)
    assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize("weight_quant,bits", [("auto", 2), ("gaussian", 2), ("lsq", 2), ("dorefa", 2),
                                               ("binary", 1), ("auto", 1)])
def test_qconv2d_low_bit_uses_quantized_weight_and_trains_float_weight(weight_quant, bits):
    torch.manual_seed(0)
    layer = QConv2d(3, 4, 3, padding=1, w_bits=bits, weight_quant=weight_quant)
    assert layer.w_bits == bits and f"w_bits={bits}" in repr(layer)
    x = torch.randn(2, 3, 5, 5)
    out = layer(x)
    assert torch.allclose(out, F.conv2d(x, layer.weight_quantizer(layer.weight), layer.bias, padding=1))
    per_channel = layer.weight_quantizer(layer.weight).reshape(4, -1)
    assert all(channel.unique().numel() <= 2**bits for channel in per_channel)
    out.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_qlinear_1bit_forward_and_gradient():
    torch.manual_seed(0)
    layer = QLinear(6, 3, w_bits=1)
    assert isinstance(layer.weight_quantizer, BinaryWeight) and "w_bits=1" in repr(layer)
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    assert layer.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# State dict round trips (resume must be exact)


def test_lsq_activation_state_dict_round_trip():
    torch.manual_seed(0)
    original = LSQActivation(3)
    original(torch.randn(8, 4).abs())
    with torch.no_grad():
        original.step.mul_(1.3)  # as if trained
    state = original.state_dict()
    assert set(state) == {"step", "initialized"}
    restored = LSQActivation(3)
    restored.load_state_dict(state)
    other_batch = torch.randn(8, 4) * 5  # must not re-initialise the restored step
    assert torch.equal(restored(other_batch), original(other_batch))
    assert torch.equal(restored.step, original.step) and bool(restored.initialized)


def test_pact_state_dict_round_trip():
    original = PACT(2)
    with torch.no_grad():
        original.alpha.fill_(1.7)
    restored = PACT(2)
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    x = torch.linspace(-1, 3, 50)
    assert restored.alpha.item() == pytest.approx(1.7)
    assert torch.equal(restored(x), original(x))


def test_lsq_conv_state_dict_round_trip():
    torch.manual_seed(0)
    original = QConv2d(2, 3, 3, w_bits=4, weight_quant="lsq")
    x = torch.randn(1, 2, 5, 5)
    original(x)
    state = original.state_dict()
    assert {"weight", "bias", "weight_quantizer.step", "weight_quantizer.initialized"} <= set(state)
    restored = QConv2d(2, 3, 3, w_bits=4, weight_quant="lsq")
    restored.load_state_dict(state)
    assert torch.equal(restored(x), original(x))


# ---------------------------------------------------------------------------------------------
# torch.compile: the straight-through identities must trace without graph breaks


def test_quantized_block_compiles_without_graph_breaks():
    torch.manual_seed(0)
    block = nn.Sequential(
        QConv2d(3, 4, 3, padding=1, w_bits=2, weight_quant="lsq"), make_act_quantizer("hwgq", 2),
        QConv2d(4, 4, 3, padding=1, w_bits=1), make_act_quantizer("lsq", 2),
        QConv2d(4, 4, 3, padding=1, w_bits=3, weight_quant="dorefa"), make_act_quantizer("pact", 3),
        QConv2d(4, 4, 3, padding=1, w_bits=4), make_act_quantizer("dorefa", 4),
    )
    x = torch.randn(2, 3, 5, 5)
    eager = block(x)  # LSQ steps initialise eagerly; afterwards forward has no data-dependent branch
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert torch.equal(out, eager)
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("name", ["hwgq", "pact", "lsq", "dorefa"])
def test_activation_quantizers_keep_an_exact_fp32_grid_under_bf16_autocast(name):
    torch.manual_seed(0)
    quantizer = make_act_quantizer(name, 2)
    x = torch.randn(64, 8) * 2
    reference = quantizer(x)  # fp32 (also initialises LSQ's step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quantizer(x.to(torch.bfloat16))
    assert y.dtype == torch.float32
    levels = torch.unique(reference)
    assert torch.isin(torch.unique(y), levels).all(), "bf16 input must land on the exact fp32 levels"


# ---------------------------------------------------------------------------------------------
# Exact low-bit arithmetic under autocast: quantized layers compute on integer codes


def exact_reference_bound(layer, x_q: torch.Tensor) -> torch.Tensor:
    """Elementwise fp32 summation-error scale of ``layer`` on the quantized input ``x_q``: the
    layer applied to |x_q| with |W_q| (and |bias|), in fp64.  Two fp32 evaluations of the same
    sum differ by at most ~K * 2^-24 times this (K terms), so 1e-5 of it is the issue's tolerance."""
    w_q = layer.weight_quantizer(layer.weight).detach().double().abs()
    bias = None if layer.bias is None else layer.bias.detach().double().abs()
    x_abs = x_q.detach().double().abs()
    if isinstance(layer, QConv2d):
        return F.conv2d(x_abs, w_q, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x_abs, w_q, bias)


def make_layer(kind: str, cin: int, cout: int, kernel: int, bias: bool, w_bits: int, weight_quant: str,
               input_quantizer: nn.Module | None, seed: int):
    torch.manual_seed(seed)
    if kind == "conv":
        return QConv2d(cin, cout, kernel, padding=kernel // 2, bias=bias, w_bits=w_bits,
                       weight_quant=weight_quant, input_quantizer=input_quantizer)
    return QLinear(cin, cout, bias=bias, w_bits=w_bits, weight_quant=weight_quant,
                   input_quantizer=input_quantizer)


def layer_input(kind: str, batch: int, cin: int, size: int, seed: int, scale: float) -> torch.Tensor:
    shape = (batch, cin, size, size) if kind == "conv" else (batch, cin)
    return randn(shape, seed, scale=scale, shift=0.3 * scale)


def check_exact_under_bf16(layer, act, x, layout: str) -> None:
    """The layer's output under bf16 autocast equals its fp32 output within fp32 summation error."""
    def run(inp):
        return layer(inp) if layout == "conv-input" else layer(act(inp))

    reference = run(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(x)
    assert out.dtype == torch.float32, "the exact path returns fp32 (a bf16 output has 8 significant bits)"
    bound = exact_reference_bound(layer, act(x))
    assert ((out.double() - reference.double()).abs() <= 1e-5 * bound + 1e-30).all()


LAYER_SHAPES = st.tuples(
    st.sampled_from(["conv", "linear"]), st.integers(1, 4),  # kind, batch
    st.integers(1, 24), st.integers(1, 12),  # in/out channels
    st.sampled_from([1, 3]), st.integers(1, 6), st.booleans(),  # kernel, spatial size, bias
)


@SETTINGS
@given(bits=BITS, weight_quant=st.sampled_from(["binary", "gaussian"]), shape=LAYER_SHAPES,
       layout=st.sampled_from(["conv-input", "post-activation"]), seed=SEEDS, scale=SCALES)
def test_quantized_layer_bf16_output_equals_fp32_output(bits, weight_quant, shape, layout, seed, scale):
    """Issue 11.5: for every bit-width and both of HWGQ's weight quantizers, a quantized layer under
    bf16 autocast gives its fp32 output (relative <= 1e-5), in both model layouts: HWGQ applied by
    the layer to its own input (``input_quantizer``), or a separate HWGQ module before it."""
    if weight_quant == "binary" and bits != 1:
        bits = 1  # binary is the 1-bit quantizer only
    kind, batch, cin, cout, kernel, size, bias = shape
    act = HWGQ(bits)
    layer = make_layer(kind, cin, cout, kernel, bias, bits, weight_quant,
                       act if layout == "conv-input" else None, seed)
    check_exact_under_bf16(layer, act, layer_input(kind, batch, cin, size, seed, scale), layout)


BASELINE_WEIGHTS = st.one_of(st.tuples(st.just("lsq"), st.integers(2, 8)), st.tuples(st.just("dorefa"), BITS))


@SETTINGS
@given(act_name=st.sampled_from(["pact", "lsq", "dorefa"]), a_bits=BITS, weight=BASELINE_WEIGHTS,
       shape=LAYER_SHAPES, seed=SEEDS, scale=SCALES, alpha=st.floats(0.1, 5.0))
def test_baseline_quantizers_are_exact_under_bf16_too(act_name, a_bits, weight, shape, seed, scale, alpha):
    """PACT/LSQ/DoReFa activations and LSQ/DoReFa weights also have integer-code grids."""
    weight_quant, w_bits = weight
    kind, batch, cin, cout, kernel, size, bias = shape
    x = layer_input(kind, batch, cin, size, seed, scale)
    act = make_act(act_name, a_bits, x, alpha)
    layer = make_layer(kind, cin, cout, kernel, bias, w_bits, weight_quant, act, seed)
    layer(x)  # LSQ weight step: lazy initialisation in fp32
    check_exact_under_bf16(layer, act, x, "conv-input")


def test_8bit_hwgq_levels_survive_a_quantized_layer_under_bf16():
    """The defect: 256 HWGQ levels become 239 distinct bf16 values (error 0.82 of a step) when the
    next layer casts them to bf16.  Through a 1x1 identity layer they must all survive exactly."""
    act = HWGQ(8)
    levels = act(torch.arange(256, dtype=torch.float32)[:, None] * act.step)
    layer = QLinear(1, 1, bias=False, w_bits=1)  # binary weight: sign(w) * |w| = 1 exactly
    with torch.no_grad():
        layer.weight.fill_(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(levels)
    assert out.unique().numel() == 256
    assert torch.equal(out, levels)


@pytest.mark.parametrize("act_name", ACT_QUANTIZERS)
@pytest.mark.parametrize("weight_quant,bits", [("binary", 1), ("gaussian", 2), ("gaussian", 8),
                                               ("lsq", 4), ("dorefa", 1), ("dorefa", 3)])
def test_exact_path_keeps_the_straight_through_gradients(act_name, weight_quant, bits):
    """Under autocast the gradients wrt the input, the latent weight, the bias and a learnable
    step (PACT alpha, LSQ steps) are the fp32 straight-through ones."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 6) * 1.5
    act = make_act(act_name, bits, x, alpha=2.0)
    layer = QConv2d(5, 4, 3, padding=1, bias=True, w_bits=bits, weight_quant=weight_quant, input_quantizer=act)
    layer(x)  # LSQ initialisation
    upstream = torch.randn(3, 4, 6, 6)

    def grads(autocast: bool):
        layer.zero_grad()
        inp = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(inp)
        (out.float() * upstream).sum().backward()
        return [inp.grad] + [p.grad.clone() for p in layer.parameters()]

    for exact, reference in zip(grads(True), grads(False)):
        assert torch.allclose(exact, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


def test_input_quantizer_fp32_path_is_bit_identical_to_a_separate_activation():
    torch.manual_seed(0)
    act = make_act_quantizer("lsq", 3)
    x = torch.randn(2, 4, 5, 5)
    separate = nn.Sequential(act, QConv2d(4, 3, 3, padding=1, w_bits=2))
    fused = QConv2d(4, 3, 3, padding=1, w_bits=2, input_quantizer=act)
    fused.load_state_dict(separate[1].state_dict() | {f"input_quantizer.{k}": v for k, v in act.state_dict().items()})
    assert torch.equal(fused(x), separate(x))
    assert set(fused.state_dict()) == {"weight", "bias", "input_quantizer.step", "input_quantizer.initialized"}


@pytest.mark.parametrize("weight_quant,bits", [("binary", 1), ("gaussian", 2), ("lsq", 3), ("dorefa", 4)])
def test_weight_grid_codes_are_small_integers_times_the_forward_scale(weight_quant, bits):
    torch.manual_seed(0)
    quantizer = make_weight_quantizer(weight_quant, bits)
    weight = torch.randn(6, 4, 3, 3)
    forward = quantizer(weight)
    codes, scale = quantizer.grid(weight)
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 2**bits - 1
    assert torch.equal(codes, codes.bfloat16().float())
    scale = scale.reshape(-1, 1, 1, 1) if isinstance(scale, torch.Tensor) and scale.dim() else scale
    assert torch.allclose(codes * scale, forward, rtol=1e-6, atol=0)


def test_exact_path_compiles_without_graph_breaks():
    torch.manual_seed(0)
    block = nn.Sequential(
        QConv2d(3, 4, 3, padding=1, w_bits=2, weight_quant="lsq"),
        QConv2d(4, 4, 3, padding=1, w_bits=1, input_quantizer=make_act_quantizer("hwgq", 2)),
        QConv2d(4, 4, 3, padding=1, w_bits=3, input_quantizer=make_act_quantizer("lsq", 3)),
    )
    x = torch.randn(2, 3, 5, 5)
    block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = block(x)
        out = torch.compile(block, backend="aot_eager", fullgraph=True)(x)
    out.sum().backward()
    assert out.dtype == torch.float32
    assert torch.allclose(out, eager, rtol=1e-6, atol=1e-6)


def test_all_quantized_w2a2_resnet_gives_its_fp32_logits_under_bf16():
    """Network level: with every layer quantized (policy ``all``, so no full-precision layer runs in
    bf16) a W2A2 ResNet-18 under bf16 autocast reproduces the fp32 logits; the plain autocast path
    (operands cast to bf16) is off by 18 % of the largest logit on this input."""
    from cmtkd.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 10, w_bits=2, a_bits=2, width=0.125, policy="all").eval()
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() <= 1e-5 * reference.abs().max()


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (10 of fp32's 23 fraction bits; round to nearest even) -> fp32, as a tensor core reads it."""
    bits = x.float().contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def test_tf32_round_emulation():
    assert tf32_round(torch.tensor([1.0, 255.0, -3.0, 0.0])).tolist() == [1.0, 255.0, -3.0, 0.0]
    assert tf32_round(torch.tensor([1 + 2.0**-10, 1 + 2.0**-12, 1 + 3 * 2.0**-11])).tolist() == \
        [1 + 2.0**-10, 1.0, 1 + 2 * 2.0**-10]


@pytest.mark.parametrize("arch,layout", [("resnet18", "conv-inputs"), ("resnet18", "block-outputs"),
                                         ("alexnet", "conv-inputs")])
@pytest.mark.parametrize("bits", [2, 4])
def test_models_quantized_layers_read_activation_values_not_codes_under_autocast(arch, layout, bits):
    """What ASSUMPTIONS W18 states: under autocast the built models' quantized layers compute on integer weight
    codes (exact in TF32) but read their activations as values ``s * code`` in fp32 (the quantizer is a module
    of its own, not the layer's ``input_quantizer``), which TF32 rounds: on CUDA with cuDNN's TF32 convolutions
    (``train.tf32: true``) the activation levels move by up to 2^-11 of their value. Should the models ever
    feed the codes themselves, this fails and W18 must change."""
    from cmtkd.models import build_model
    from cmtkd.quant.common import HWGQ_STEPS

    torch.manual_seed(0)
    model = build_model(arch, 10, bits, bits, width=0.125, quant_layout=layout).train()
    seen = []
    for name, layer in model.named_modules():
        if isinstance(layer, (QConv2d, QLinear)) and layer.w_bits != 32:
            def record(x, w, b, name=name, apply=layer._apply_weight):
                seen.append((name, x.detach(), w.detach()))
                return apply(x, w, b)
            layer._apply_weight = record
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(8, 3, 32, 32))
    assert len(seen) >= 6  # AlexNet: conv2-conv5, fc6, fc7; ResNet-18: every conv but the stem
    step = HWGQ_STEPS[bits]
    moved = 0
    for name, x, w in seen:
        assert x.dtype == w.dtype == torch.float32, name
        assert torch.equal(w, w.round()) and torch.equal(tf32_round(w), w), name  # weight codes: exact in TF32
        assert torch.equal(x, torch.round(x / step) * step), name  # on the quantizer's grid ...
        assert not torch.equal(x, x.round()), name  # ... as values, not codes
        relative = ((tf32_round(x) - x).abs() / x.abs().clamp_min(1e-30))[x != 0]
        assert float(relative.max()) <= 2.0**-11, name
        moved += int((tf32_round(x) != x).sum())
    assert moved > 0
