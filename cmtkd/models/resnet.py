"""ResNet-18 (He et al., 2016) with quantized convolutions and HWGQ activations in place of ReLUs.

Stages: ``stem, layer1, layer2, layer3, layer4, head``. The CIFAR variant uses a 3x3 stride-1 stem
without max-pool (an ImageNet stem on 32x32 inputs loses ~15-20 points); the ImageNet variant is
torchvision's layout (7x7/2 conv + max-pool), with the same parameter count (11.69 M at 1000 classes).
"""
from __future__ import annotations

from torch import nn

from cmtkd.models.common import LayerFactory, StagedNet, init_weights, scaled


class BasicBlock(nn.Module):
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


class Head(nn.Module):
    def __init__(self, fc: nn.Module):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


class ResNet18(StagedNet):
    def __init__(self, num_classes: int, w_bits: int = 32, a_bits: int = 32, variant: str = "cifar",
                 width: float = 1.0, in_channels: int = 3, policy: str = "fp-first-last",
                 weight_quant: str = "auto", act_quant: str = "hwgq"):
        super().__init__()
        f = LayerFactory(w_bits, a_bits, policy, weight_quant, act_quant)
        widths = [scaled(c, width) for c in (64, 128, 256, 512)]
        if variant == "cifar":
            stem = nn.Sequential(f.conv(in_channels, widths[0], 3, 1, 1, role="first"),
                                 nn.BatchNorm2d(widths[0]), f.act())
        elif variant == "imagenet":
            stem = nn.Sequential(f.conv(in_channels, widths[0], 7, 2, 3, role="first"),
                                 nn.BatchNorm2d(widths[0]), f.act(), nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"unknown variant {variant}")
        stages = {"stem": stem}
        cin = widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages[f"layer{i + 1}"] = nn.Sequential(BasicBlock(f, cin, cout, stride), BasicBlock(f, cout, cout, 1))
            cin = cout
        stages["head"] = Head(f.linear(cin, num_classes, role="last"))
        self.stages = nn.ModuleDict(stages)
        init_weights(self)
