"""AlexNet (Krizhevsky et al., 2012) with batch normalisation after every quantized layer, as in
HWGQ/LQ-Nets low-bit AlexNets (BN is what makes 1-2-bit AlexNets trainable). No dropout.

Stages: ``conv1 .. conv5, head`` (head = fc6, fc7, fc8). A plain chain quantizes every layer's input
whichever ``quant_layout`` is chosen (conv -> BN -> quantizer -> [pool] -> next layer; max-pooling
commutes with the monotone quantizer); the layouts differ only in what fc8 reads when the policy keeps it
full precision: ``conv-inputs`` (default, as the HWGQ/EdMIPS references) a full-precision ReLU,
``block-outputs`` the quantizer's output. ImageNet variant: 11x11/4 stem, 3x3/2 max-pools, 4096-4096 FC,
with the channels ``channels`` names: ``hwgq`` (96-256-384-384-256, CaffeNet's, as the HWGQ and LQ-Nets
AlexNets; without CaffeNet's two-tower groups) or ``torchvision`` (64-192-384-256-256); ``auto`` is
``hwgq`` on ImageNet. CIFAR variant (ours; the paper's is not described): torchvision's channels,
3x3 stride-1 convs, 2x2 max-pools after conv1, conv2, conv5, and 1024-1024 FC layers.
"""
from __future__ import annotations

from torch import nn

from cmtkd.errors import UserError
from cmtkd.models.common import LayerFactory, StagedNet, check_quant_layout, init_weights, scaled

CHANNELS = {"torchvision": (64, 192, 384, 256, 256),  # torchvision's AlexNet (one-tower)
            "hwgq": (96, 256, 384, 384, 256)}  # CaffeNet's channels, as the HWGQ and LQ-Nets AlexNets (ledger R7)


class AlexNetHead(nn.Module):
    def __init__(self, f: LayerFactory, cin: int, pool: int, hidden: int, num_classes: int, quant_layout: str):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc6 = f.linear(cin * pool * pool, hidden, bias=False)
        self.bn6 = nn.BatchNorm1d(hidden)
        self.act6 = f.act()
        self.fc7 = f.linear(hidden, hidden, bias=False)
        self.bn7 = nn.BatchNorm1d(hidden)
        # the input of fc8: quantized only if fc8 is (conv-inputs), always quantized (block-outputs)
        self.act7 = f.input_act("last") if quant_layout == "conv-inputs" else f.act()
        self.fc8 = f.linear(hidden, num_classes, role="last")

    def forward(self, x):
        x = self.pool(x).flatten(1)
        x = self.act6(self.bn6(self.fc6(x)))
        x = self.act7(self.bn7(self.fc7(x)))
        return self.fc8(x)


class AlexNet(StagedNet):
    def __init__(self, num_classes: int, w_bits: int = 32, a_bits: int = 32, variant: str = "cifar",
                 width: float = 1.0, in_channels: int = 3, policy: str = "fp-first-last",
                 weight_quant: str = "auto", act_quant: str = "hwgq", quant_layout: str = "conv-inputs",
                 channels: str = "torchvision"):
        super().__init__()
        f = LayerFactory(w_bits, a_bits, policy, weight_quant, act_quant)
        self.quant_layout = check_quant_layout(quant_layout)
        if channels not in CHANNELS:
            raise UserError(f"unknown model.alexnet_channels '{channels}'; choose one of: auto, {', '.join(CHANNELS)}")
        ch = [scaled(c, width) for c in CHANNELS[channels]]
        if variant == "imagenet":
            kernels, strides, pads = (11, 5, 3, 3, 3), (4, 1, 1, 1, 1), (2, 2, 1, 1, 1)
            pool = lambda: nn.MaxPool2d(3, 2)  # noqa: E731
            head_pool, hidden = 6, scaled(4096, width)
        elif variant == "cifar":
            kernels, strides, pads = (3, 3, 3, 3, 3), (1, 1, 1, 1, 1), (1, 1, 1, 1, 1)
            pool = lambda: nn.MaxPool2d(2)  # noqa: E731
            head_pool, hidden = 4, scaled(1024, width)
        else:
            raise ValueError(f"unknown variant {variant}")
        stages = {}
        cin = in_channels
        for i, cout in enumerate(ch):
            layers = [f.conv(cin, cout, kernels[i], strides[i], pads[i], role="first" if i == 0 else "body"),
                      nn.BatchNorm2d(cout), f.act()]
            if i in (0, 1, 4):
                layers.append(pool())
            stages[f"conv{i + 1}"] = nn.Sequential(*layers)
            cin = cout
        stages["head"] = AlexNetHead(f, cin, head_pool, hidden, num_classes, quant_layout)
        self.stages = nn.ModuleDict(stages)
        init_weights(self)
