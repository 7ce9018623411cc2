"""cmtkd: Collaborative Multi-Teacher Knowledge Distillation for low bit-width DNNs (WACV 2023).

Public API: :func:`load_student` (a trained run's student as an ``nn.Module``) and :func:`load_run`
(the same plus config, metrics and history); the ``cmtkd`` command (also ``python -m cmtkd``)."""
__version__ = "0.1.0"

__all__ = ["__version__", "load_run", "load_student"]


def load_student(path, device="cpu"):
    """The selected student of a run directory (or its ``model.pt``), eval mode; see :mod:`cmtkd.api`."""
    from cmtkd.api import load_student as _load_student

    return _load_student(path, device)


def load_run(path, device="cpu"):
    """A run directory read back (config, student, metrics, history); see :class:`cmtkd.api.Run`."""
    from cmtkd.api import load_run as _load_run

    return _load_run(path, device)
