"""The memory one network of a run needs, sized before anything is allocated.

A config can ask for any network: ``model.width: 1e6`` describes 10^19 parameters, and building it
would try to allocate them. :func:`check_network_size` builds the run's student under PyTorch's fake
tensors (shapes only, no memory; a few tenths of a second), counts its parameters and the elements
every layer outputs for one image, and refuses a config whose estimate exceeds
``train.max_network_gib``, naming the estimate, the cap and the keys that change it. ``cmtkd train``
checks before it creates the run directory, and the workflow's pre-start check (``--print-config``)
applies the same bound to every run of the grid.

The estimate is a deliberate upper-range figure for one network: 4 bytes for each parameter, its
gradient, its momentum and one spare copy, plus 4 bytes for each layer output of a batch (what autograd
may keep for backward). A method with teachers trains several networks; each is bounded alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cmtkd.errors import UserError

if TYPE_CHECKING:
    from cmtkd.config import RunConfig

BYTES_PER_ELEMENT = 4  # fp32
COPIES_PER_PARAMETER = 4  # weight, gradient, momentum, one spare


@dataclass(frozen=True)
class Footprint:
    parameters: int
    activations_per_image: int  # elements every leaf module outputs in a training forward, for one image
    batch_size: int

    @property
    def gib(self) -> float:
        elements = COPIES_PER_PARAMETER * self.parameters + self.batch_size * self.activations_per_image
        return BYTES_PER_ELEMENT * elements / 2**30


def nominal_info(cfg: RunConfig):
    """The dataset facts a network of ``cfg`` is built from (cmtkd.data.common.NOMINAL), without its files."""
    from cmtkd.data.common import NOMINAL, DataInfo, check_digits_size

    num_classes, channels, size, variant = NOMINAL[cfg.data.name]
    if cfg.data.name == "digits":
        size = check_digits_size(cfg.data.image_size)
    return DataInfo(name=cfg.data.name, num_classes=num_classes, in_channels=channels, image_size=size,
                    variant=variant, num_train=0, num_val=0, num_test=0)


def check_method_builds(cfg: RunConfig) -> None:
    """Build the method of ``cfg`` (resolved) on the meta device, reading no file (teachers and
    ``model.init_from`` stood in by untrained networks: cmtkd.teachers.stand_in_files), so that every
    option checked only when the networks exist (e.g. CMT-KD's fusion points) fails here, in one line,
    before a run directory or a workflow job exists."""
    import torch

    from cmtkd.registry import get_method
    from cmtkd.teachers import stand_in_files

    with stand_in_files(), torch.device("meta"):
        get_method(cfg.method)(cfg, nominal_info(cfg))


def network_footprint(cfg: RunConfig) -> Footprint:
    """The student network of ``cfg`` (resolved) sized under fake tensors. Raises UserError when the
    network is too large for torch even to describe (its sizes overflow 64 bits)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cmtkd.methods.base import arch_config
    from cmtkd.models import build_model

    info = nominal_info(cfg)
    channels, size = info.in_channels, info.image_size
    kwargs = arch_config(cfg, info, cfg.w_bits, cfg.a_bits)
    outputs = [0]

    def count(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            outputs[0] += output.numel()

    try:
        with FakeTensorMode():
            network = build_model(**kwargs).train()
            parameters = sum(p.numel() for p in network.parameters())
            for module in network.modules():
                if next(module.children(), None) is None:
                    module.register_forward_hook(count)
            network(torch.empty(2, channels, size, size))  # 2: BatchNorm needs more than one image
    except (RuntimeError, OverflowError, ValueError) as exc:
        if "overflow" not in str(exc).lower() and not isinstance(exc, OverflowError):
            raise
        raise UserError(f"the network this config describes is too large for torch to size (model.width="
                        f"{cfg.model.width:g}: {str(exc).splitlines()[0][:80]}); use a smaller model.width") from None
    return Footprint(parameters=parameters, activations_per_image=outputs[0] // 2, batch_size=cfg.data.batch_size)


def check_network_size(cfg: RunConfig) -> Footprint:
    """Refuse ``cfg`` (resolved) in one line if one network of it would need more than
    ``train.max_network_gib``; returns the estimate otherwise."""
    footprint = network_footprint(cfg)
    cap = cfg.train.max_network_gib
    if footprint.gib > cap:
        raise UserError(
            f"one network of this config needs about {footprint.gib:,.3g} GiB for a training step "
            f"({footprint.parameters:.3g} parameters; {footprint.activations_per_image:.3g} layer outputs per "
            f"image x data.batch_size={footprint.batch_size}), more than train.max_network_gib={cap:g}; make "
            f"model.width or data.batch_size smaller, or raise train.max_network_gib if the machine has the memory")
    return footprint
