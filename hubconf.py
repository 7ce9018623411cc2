"""torch.hub entry points (local checkouts; no URL is ever fetched):

    model = torch.hub.load("path/to/cmtkd", "student", source="local", run_dir="runs/cmtkd-w2a2")
    net = torch.hub.load("path/to/cmtkd", "resnet18", source="local", num_classes=100, w_bits=2, a_bits=2)

``student`` is a trained run's selected student (:func:`cmtkd.load_student`); ``resnet18`` and
``alexnet`` are untrained quantized networks (:func:`cmtkd.models.build_model`).
"""
dependencies = ["torch", "yaml"]


def student(run_dir: str, device: str = "cpu"):
    """The selected student of a finished ``cmtkd train`` run (its directory or its model.pt), eval mode."""
    import cmtkd

    return cmtkd.load_student(run_dir, device)


def resnet18(num_classes: int = 100, w_bits: int = 32, a_bits: int = 32, variant: str = "cifar", **kwargs):
    """An untrained quantized ResNet-18 (keyword args as cmtkd.models.build_model)."""
    from cmtkd.models import build_model

    return build_model("resnet18", num_classes, w_bits=w_bits, a_bits=a_bits, variant=variant, **kwargs)


def alexnet(num_classes: int = 100, w_bits: int = 32, a_bits: int = 32, variant: str = "cifar", **kwargs):
    """An untrained quantized AlexNet (keyword args as cmtkd.models.build_model)."""
    from cmtkd.models import build_model

    return build_model("alexnet", num_classes, w_bits=w_bits, a_bits=a_bits, variant=variant, **kwargs)
