"""Model families: shapes, parameter counts, stages, quantization policies, width, bad names."""
from __future__ import annotations

import pytest
import torch
import torchvision

from cmtkd.errors import UserError
from cmtkd.models import ARCHS, POLICIES, StagedNet, build_model
from cmtkd.quant import HWGQ, HWGQ_STEPS, QConv2d, QLinear


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_and_last_layers(model: StagedNet) -> tuple[QConv2d, QLinear]:
    layers = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    return layers[0], layers[-1]


def body_layers(model: StagedNet) -> list:
    return [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))][1:-1]


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


# --------------------------------------------------------------------------------- counts
# EdMIPS's pre-activation block adds one BN (weight + bias) on each block's input: 2 x (64 + 64 + 64
# + 128 + 128 + 256 + 256 + 512) = 2,944 parameters over torchvision's ResNet-18.
PRE_ACT_BN_PARAMS = 2 * (64 * 3 + 128 * 2 + 256 * 2 + 512)


def test_imagenet_resnet18_has_torchvision_parameter_count():
    model = build_model("resnet18", 1000, 32, 32, variant="imagenet", quant_layout="block-outputs")
    assert n_params(model) == n_params(torchvision.models.resnet18()) == 11_689_512


def test_imagenet_resnet18_conv_inputs_layout_is_torchvision_plus_one_bn_per_block():
    model = build_model("resnet18", 1000, 32, 32, variant="imagenet", quant_layout="conv-inputs")
    assert n_params(model) == 11_689_512 + PRE_ACT_BN_PARAMS == 11_692_456


@pytest.mark.parametrize("layout,count", [("block-outputs", 11_689_512), ("conv-inputs", 11_692_456)])
def test_quantized_resnet18_has_no_extra_parameters_with_fixed_step_quantizers(layout, count):
    # HWGQ and the Gaussian weight quantizer have fixed steps: quantizing adds no parameters.
    model = build_model("resnet18", 1000, 2, 2, variant="imagenet", quant_layout=layout)
    assert n_params(model) == count


def test_width_multiplier_reduces_parameters():
    for arch in ARCHS:
        counts = [n_params(build_model(arch, 10, 2, 2, width=w)) for w in (1.0, 0.5, 0.25)]
        assert counts[0] > counts[1] > counts[2], arch
        assert counts[1] < 0.3 * counts[0]  # conv/fc weights scale roughly with width^2


# --------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 28)])
def test_cifar_variant_output_shape(arch, in_channels, size):
    model = build_model(arch, 100, 2, 2, variant="cifar", width=0.25, in_channels=in_channels)
    assert logits(model, torch.randn(3, in_channels, size, size)).shape == (3, 100)


def test_imagenet_variants_output_shape():
    x = torch.randn(2, 3, 224, 224)
    for arch, width in (("alexnet", 1.0), ("resnet18", 0.25)):
        model = build_model(arch, 1000, 2, 2, variant="imagenet", width=width)
        out = logits(model, x)
        assert out.shape == (2, 1000), arch
        assert torch.isfinite(out).all()


def test_imagenet_alexnet_matches_torchvision_layout():
    model = build_model("alexnet", 1000, 32, 32, variant="imagenet")
    convs = [m for m in model.modules() if isinstance(m, QConv2d)]
    reference = [m for m in torchvision.models.alexnet().modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == \
        [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in reference]
    fcs = [m for m in model.modules() if isinstance(m, QLinear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(9216, 4096), (4096, 4096), (4096, 1000)]


def test_training_step_runs_in_train_mode():
    model = build_model("resnet18", 10, 2, 2, variant="cifar", width=0.125, in_channels=1).train()
    out = model(torch.randn(4, 1, 28, 28))
    torch.nn.functional.cross_entropy(out, torch.arange(4)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("arch,names", [
    ("resnet18", ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
    ("alexnet", ["conv1", "conv2", "conv3", "conv4", "conv5", "head"]),
])
def test_stage_names_and_forward_features(arch, names):
    model = build_model(arch, 10, 2, 2, variant="cifar", width=0.25).eval()
    assert model.stage_names == names
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
    assert list(feats) == names
    assert torch.equal(feats[names[-1]], out)
    assert all(f.shape[0] == 2 for f in feats.values())
    # Features are stage outputs in order: feeding a stage output into the next stage gives the next.
    with torch.no_grad():
        assert torch.equal(model.stages[names[1]](feats[names[0]]), feats[names[1]])


def test_resnet_stage_resolutions_cifar():
    model = build_model("resnet18", 10, 32, 32, variant="cifar", width=0.25).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape[-2:]) for f in list(feats.values())[:-1]] == [(32, 32), (32, 32), (16, 16), (8, 8), (4, 4)]


# ------------------------------------------------------------------------------- policies
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("policy,edge_bits", [("fp-first-last", 32), ("8bit-first-last", 8), ("all", 2)])
def test_policy_sets_first_and_last_layer_bits(arch, policy, edge_bits):
    model = build_model(arch, 10, 2, 2, width=0.25, policy=policy)
    first, last = first_and_last_layers(model)
    assert isinstance(first, QConv2d) and isinstance(last, QLinear)
    assert first.w_bits == last.w_bits == edge_bits
    assert (first.weight_quantizer.bits, last.weight_quantizer.bits) == (edge_bits, edge_bits)
    body = body_layers(model)
    assert body and all(m.w_bits == 2 for m in body)


def test_policy_first_layer_quantized_output_differs():
    # "all" really quantizes the stem: the same latent weights give a different stem output.
    torch.manual_seed(0)
    fp_edges = build_model("resnet18", 10, 2, 2, width=0.25, policy="fp-first-last").eval()
    quant_edges = build_model("resnet18", 10, 2, 2, width=0.25, policy="all").eval()
    quant_edges.load_state_dict(fp_edges.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(fp_edges.stages["stem"][0](x), quant_edges.stages["stem"][0](x))


@pytest.mark.parametrize("policy", list(POLICIES))
def test_full_precision_network_stays_full_precision_under_every_policy(policy):
    model = build_model("resnet18", 10, 32, 32, width=0.25, policy=policy)
    assert all(m.w_bits == 32 for m in model.modules() if isinstance(m, (QConv2d, QLinear)))


@pytest.mark.parametrize("layout,n_quantizers", [
    ("conv-inputs", 8 * 2 + 3),    # one per quantized conv: two per block + three 1x1 downsamples
    ("block-outputs", 1 + 8 * 2),  # stem + two per basic block: every ReLU is replaced
])
def test_activation_bits_follow_a_bits(layout, n_quantizers):
    model = build_model("resnet18", 10, 4, 3, width=0.25, quant_layout=layout)
    acts = [m for m in model.modules() if isinstance(m, HWGQ)]
    assert len(acts) == n_quantizers
    assert {m.bits for m in acts} == {3}
    assert {m.w_bits for m in body_layers(model)} == {4}


# ------------------------------------------------------------------------------ bad names
@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="vgg16"), "unknown arch 'vgg16'"),
    (dict(variant="tiny"), "unknown model variant 'tiny'"),
    (dict(policy="half"), "unknown quantization policy 'half'"),
    (dict(weight_quant="ternary"), "unknown weight quantizer"),
    (dict(act_quant="relu6"), "unknown activation quantizer"),
    (dict(w_bits=9), "bit-width"),
])
def test_bad_names_are_user_errors(kwargs, match):
    args = dict(arch="resnet18", num_classes=10, w_bits=2, a_bits=2, width=0.25) | kwargs
    with pytest.raises(UserError, match=match):
        build_model(**args)


# --------------------------------------------------------------------------- quantization layout
def hwgq_on_grid(x: torch.Tensor, bits: int) -> bool:
    levels = x / HWGQ_STEPS[bits]
    return bool(((levels - levels.round()).abs() < 1e-3).all() and levels.min() >= 0
                and levels.max() <= 2**bits - 1 + 1e-3)


def layer_inputs(model: StagedNet, x: torch.Tensor, types=(QConv2d, QLinear)) -> dict[str, torch.Tensor]:
    """The input of every module of ``types``, by module name, for one eval forward."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, types):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, name=name: seen.__setitem__(name, inp[0])))
    logits(model, x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("variant,size", [("cifar", 28), ("imagenet", 64)])
def test_conv_inputs_layout_quantizes_every_quantized_layer_input_and_nothing_else(variant, size):
    # The EdMIPS/HWGQ ResNet: each quantized conv (downsample included) reads a 2-bit tensor; the
    # residual stream and the input of the full-precision FC are full precision (> 2^b values).
    model = build_model("resnet18", 10, 2, 2, variant=variant, width=0.25, in_channels=1,
                        quant_layout="conv-inputs")
    x = torch.randn(4, 1, size, size)
    inputs = layer_inputs(model, x)
    quantized = [n for n in inputs if n.split(".")[-1] != "fc" and n != "stages.stem.0"]
    assert len(quantized) == 19 and any("downsample" in n for n in quantized)  # 16 3x3 + 3 1x1 convs
    for name in quantized:
        assert hwgq_on_grid(inputs[name], 2), name
    # what the head averages and feeds to the FC: ReLU'd, full precision
    pooled = layer_inputs(model, x, torch.nn.AdaptiveAvgPool2d)["stages.head.pool"]
    assert pooled.min() >= 0 and pooled.unique().numel() > 2**2 and not hwgq_on_grid(pooled, 2)
    feats = model.forward_features(x)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert feats[stage].unique().numel() > 2**2 and (feats[stage] < 0).any(), stage


def test_block_outputs_layout_quantizes_residual_stream_and_fc_input():
    model = build_model("resnet18", 10, 2, 2, width=0.25, in_channels=1, quant_layout="block-outputs")
    x = torch.randn(4, 1, 28, 28)
    feats = model.forward_features(x)
    for stage in ("stem", "layer1", "layer2", "layer3", "layer4"):
        assert hwgq_on_grid(feats[stage], 2), stage
    assert hwgq_on_grid(layer_inputs(model, x, torch.nn.AdaptiveAvgPool2d)["stages.head.pool"], 2)


def test_default_layout_is_the_reference_one():
    from cmtkd.config import ModelConfig

    assert ModelConfig().quant_layout == "conv-inputs"
    for arch in ARCHS:
        assert build_model(arch, 10, 2, 2, width=0.25).quant_layout == "conv-inputs"


@pytest.mark.parametrize("layout,fc8_on_grid", [("conv-inputs", False), ("block-outputs", True)])
def test_alexnet_last_layer_input_follows_layout(layout, fc8_on_grid):
    model = build_model("alexnet", 10, 2, 2, width=0.25, in_channels=1, quant_layout=layout)
    # 32x32: the head's adaptive pool is then the identity, so fc6 reads conv5's grid unchanged
    inputs = layer_inputs(model, torch.randn(8, 1, 32, 32))
    for name, x in inputs.items():  # every quantized layer reads the 2-bit grid in both layouts
        if name not in ("stages.conv1.0", "stages.head.fc8"):
            assert hwgq_on_grid(x, 2), name
    assert hwgq_on_grid(inputs["stages.head.fc8"], 2) is fc8_on_grid
    assert inputs["stages.head.fc8"].min() >= 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_conv_inputs_quantizes_a_quantized_last_layer_input(arch):
    # policy=all quantizes the classifier's weights, so conv-inputs quantizes its input as well
    model = build_model(arch, 10, 2, 2, width=0.25, in_channels=1, policy="all", quant_layout="conv-inputs")
    x = torch.randn(4, 1, 28, 28)
    if arch == "resnet18":  # the FC reads the average of the quantized map
        assert hwgq_on_grid(layer_inputs(model, x, torch.nn.AdaptiveAvgPool2d)["stages.head.pool"], 2)
    else:
        assert hwgq_on_grid(layer_inputs(model, x)["stages.head.fc8"], 2)


def test_unknown_layout_is_a_user_error():
    with pytest.raises(UserError, match="quant_layout"):
        build_model("resnet18", 10, 2, 2, quant_layout="everywhere")


def test_model_file_without_layout_key_loads_as_block_outputs(tmp_path):
    # model.pt files written before model.quant_layout existed were trained with block-outputs
    from cmtkd import checkpoint

    config = dict(arch="resnet18", num_classes=10, in_channels=1, variant="cifar", width=0.25, w_bits=2,
                  a_bits=2, policy="fp-first-last", weight_quant="auto", act_quant="hwgq")
    old = build_model(**config, quant_layout="block-outputs")
    checkpoint.save_model(tmp_path / "model.pt", arch_config=config, state_dict=old.state_dict(), method="qat",
                          selected_epoch=1, config_hash="0" * 64)
    blob = checkpoint.load_model(tmp_path / "model.pt", "retrain")
    model = checkpoint.build_network(blob, tmp_path / "model.pt", "retrain")
    assert model.quant_layout == "block-outputs"


def test_imagenet_alexnet_hwgq_channels_are_caffenets():
    """model.alexnet_channels=hwgq (the default on ImageNet, ledger R7): 96-256-384-384-256, as the HWGQ and
    LQ-Nets AlexNets whose numbers results/paper/reported.csv quotes; same kernels, strides and FC sizes."""
    model = build_model("alexnet", 1000, 2, 2, variant="imagenet", alexnet_channels="hwgq")
    convs = [m for m in model.modules() if isinstance(m, QConv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == \
        [(3, 96, 11, 4), (96, 256, 5, 1), (256, 384, 3, 1), (384, 384, 3, 1), (384, 256, 3, 1)]
    assert [(f.in_features, f.out_features) for f in model.modules() if isinstance(f, QLinear)] == \
        [(9216, 4096), (4096, 4096), (4096, 1000)]
    with pytest.raises(UserError, match="alexnet_channels"):
        build_model("alexnet", 10, alexnet_channels="vgg")


def test_alexnet_channels_resolve_by_dataset_and_reach_the_model_file_only_when_not_torchvisions():
    from cmtkd.config import build_config, config_hash
    from cmtkd.data import DataInfo
    from cmtkd.registry import get_method

    imagenet = DataInfo(name="imagenet", num_classes=1000, in_channels=3, image_size=224, variant="imagenet",
                        num_train=1, num_val=0, num_test=0)
    digits = DataInfo(name="digits", num_classes=10, in_channels=1, image_size=28, variant="cifar",
                      num_train=1, num_val=0, num_test=0)
    cfg = build_config([{"method": "qat", "arch": "alexnet", "model": {"width": 0.125}}])
    with torch.device("meta"):
        on_imagenet = get_method("qat")(cfg, imagenet).arch_config(2, 2)
        on_digits = get_method("qat")(cfg, digits).arch_config(2, 2)
        chosen = get_method("qat")(build_config([{"method": "qat", "arch": "alexnet", "model": {
            "width": 0.125, "alexnet_channels": "torchvision"}}]), imagenet).arch_config(2, 2)
    assert on_imagenet["alexnet_channels"] == "hwgq"
    assert "alexnet_channels" not in on_digits and "alexnet_channels" not in chosen  # model files as before
    plain = build_config([{"method": "qat", "arch": "alexnet"}])
    as_before = {k: v for k, v in to_dict_without(plain, "alexnet_channels").items()}
    assert config_hash(plain) == config_hash(as_before)


def to_dict_without(cfg, key):
    from cmtkd.config import to_dict

    d = to_dict(cfg)
    d["model"].pop(key)
    return d
