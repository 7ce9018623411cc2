"""Name -> class registries for methods (CMT-KD and baselines). A new method is one file plus one
``@register_method("name")`` line; importing ``baselines`` and ``cmtkd.methods`` fills the registry."""
from __future__ import annotations

from cmtkd.errors import UserError

METHODS: dict[str, type] = {}


def register_method(name: str):
    def deco(cls):
        if name in METHODS:
            raise RuntimeError(f"method '{name}' registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def _load_all() -> None:
    import baselines  # noqa: F401  (registers fp, qat, kd, ...)
    import cmtkd.methods  # noqa: F401  (registers cmtkd and its ablations)


def get_method(name: str) -> type:
    _load_all()
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_names() -> list[str]:
    _load_all()
    return sorted(METHODS)
