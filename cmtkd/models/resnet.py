"""ResNet-18 (He et al., 2016) with quantized convolutions and HWGQ activation quantizers.

Stages: ``stem, layer1, layer2, layer3, layer4, head``. The CIFAR variant uses a 3x3 stride-1 stem
without max-pool (an ImageNet stem on 32x32 inputs loses ~15-20 points); the ImageNet variant has
torchvision's 7x7/2 conv + max-pool stem.

Two quantization layouts (``quant_layout``, ledger Q7):

* ``conv-inputs`` (default): the EdMIPS low-bit ResNet (REF). Pre-activation blocks: ``bn0`` on the
  block input, then each conv (the 1x1 downsample too) reads the activation quantizer's output; BN after
  each conv; the residual add has no activation, so the residual stream is full precision. The stem is
  conv (+ max-pool) + BN without ReLU; the head is ReLU -> average pool -> full-precision FC. Parameter
  count: torchvision's plus one BN per block (11,692,456 at 1000 classes, as EdMIPS's model).
* ``block-outputs``: the post-activation torchvision block with every ReLU replaced by the quantizer,
  the block output included, so the residual stream and the FC input are low-bit. Exactly
  torchvision's parameter count (11,689,512).
"""
from __future__ import annotations

from torch import nn

from cmtkd.models.common import LayerFactory, StagedNet, check_quant_layout, init_weights, scaled


class BasicBlock(nn.Module):
    """Post-activation block of the ``block-outputs`` layout."""

    def __init__(self, f: LayerFactory, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = f.conv(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = f.act()
        self.conv2 = f.conv(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(f.conv(cin, cout, 1, stride, 0), nn.BatchNorm2d(cout))
        self.act2 = f.act()  # the block output is quantized: it is the next block's conv input

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + identity)


class PreActBlock(nn.Module):
    """Pre-activation block of the ``conv-inputs`` layout (EdMIPS's ``BasicBlock``): every conv's input
    is quantized, the shortcut and the output (``out + residual``, no activation) stay full precision."""

    def __init__(self, f: LayerFactory, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(cin)
        self.quant1 = f.act()
        self.conv1 = f.conv(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.quant2 = f.act()  # also the block's only non-linearity between conv1 and conv2
        self.conv2 = f.conv(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(f.act(), f.conv(cin, cout, 1, stride, 0), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn0(x)
        # EdMIPS: the downsample reads bn0(x); an identity shortcut carries x itself.
        identity = x if self.downsample is None else self.downsample(out)
        out = self.bn1(self.conv1(self.quant1(out)))
        out = self.bn2(self.conv2(self.quant2(out)))
        return out + identity

    # The block split at what its conv path reads (CMT-KD's ``fusion_input: stage-input``, ledger A5):
    # ``from_input(*read_input(x))`` is ``forward(x)``.
    def read_input(self, x):
        """``quant1(bn0(x))``, the tensor the 3x3 conv reads, and what the rest of the block needs."""
        normed = self.bn0(x)
        return (x, normed), self.quant1(normed)

    def from_input(self, context, q):
        """The block's output from ``q`` (its conv path's input). ``context`` None: ``q`` also feeds the
        1x1 downsample's conv in place of its own quantized ``bn0(x)`` (EdMIPS's stage-opening block reads
        one tensor on both paths); only a block with a downsample can run without its input ``x``."""
        if context is None:
            if self.downsample is None:
                raise ValueError("a block with an identity shortcut needs its input x")
            identity = self.downsample[1:](q)
        else:
            x, normed = context
            identity = x if self.downsample is None else self.downsample(normed)
        out = self.bn1(self.conv1(q))
        out = self.bn2(self.conv2(self.quant2(out)))
        return out + identity


class Head(nn.Module):
    def __init__(self, fc: nn.Module, act: nn.Module | None = None):
        super().__init__()
        self.act = act if act is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc

    def forward(self, x):
        return self.fc(self.pool(self.act(x)).flatten(1))

    def read_input(self, x):
        """What the classifier reads (ReLU, or the quantizer), as :meth:`PreActBlock.read_input`."""
        return None, self.act(x)

    def from_input(self, context, q):
        return self.fc(self.pool(q).flatten(1))


class ResNet18(StagedNet):
    def __init__(self, num_classes: int, w_bits: int = 32, a_bits: int = 32, variant: str = "cifar",
                 width: float = 1.0, in_channels: int = 3, policy: str = "fp-first-last",
                 weight_quant: str = "auto", act_quant: str = "hwgq", quant_layout: str = "conv-inputs"):
        super().__init__()
        f = LayerFactory(w_bits, a_bits, policy, weight_quant, act_quant)
        self.quant_layout = check_quant_layout(quant_layout)
        pre_act = quant_layout == "conv-inputs"
        widths = [scaled(c, width) for c in (64, 128, 256, 512)]
        if variant == "cifar":
            stem = [f.conv(in_channels, widths[0], 3, 1, 1, role="first"), nn.BatchNorm2d(widths[0])]
            if not pre_act:
                stem.append(f.act())
        elif variant == "imagenet":
            first = f.conv(in_channels, widths[0], 7, 2, 3, role="first")
            # EdMIPS: conv -> max-pool -> BN, no ReLU (the first block's bn0 + quantizer follow)
            stem = [first, nn.MaxPool2d(3, 2, 1), nn.BatchNorm2d(widths[0])] if pre_act else \
                [first, nn.BatchNorm2d(widths[0]), f.act(), nn.MaxPool2d(3, 2, 1)]
        else:
            raise ValueError(f"unknown variant {variant}")
        block = PreActBlock if pre_act else BasicBlock
        stages = {"stem": nn.Sequential(*stem)}
        cin = widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages[f"layer{i + 1}"] = nn.Sequential(block(f, cin, cout, stride), block(f, cout, cout, 1))
            cin = cout
        stages["head"] = Head(f.linear(cin, num_classes, role="last"), f.input_act("last") if pre_act else None)
        self.stages = nn.ModuleDict(stages)
        init_weights(self)
