"""Method name -> class, through the catalog (:mod:`cmtkd.catalog`). A method's module is imported
the first time the method is asked for, so importing this module imports no method."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from cmtkd.catalog import MethodEntry, catalog, method_entry
from cmtkd.errors import UserError

_LOADED: dict[tuple[str, str], type] = {}


def _import_module(name: str, entry: MethodEntry):
    module_name = entry.target.rpartition(":")[0]
    try:
        if not module_name.endswith(".py"):
            return importlib.import_module(module_name)
        path = Path(module_name)
        if not path.is_file():
            raise ModuleNotFoundError(f"no file {path}")
        # A method file outside any package: imported under a name of its own, once.
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        unique = f"cmtkd_method_{path.stem}_{digest}"
        if unique not in sys.modules:
            spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[unique] = module  # dataclasses and typing look classes' modules up here
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[unique]
                raise
        return sys.modules[unique]
    except ImportError as exc:
        raise UserError(f"method '{name}': cannot import {module_name} (catalog target {entry.target}): {exc}") from None


def get_method(name: str) -> type:
    """The class of method ``name`` (a :class:`cmtkd.methods.base.Method` subclass)."""
    from cmtkd.methods.base import Method

    entry = method_entry(name)  # UserError for unknown names
    key = (name, entry.target)
    if key not in _LOADED:
        module = _import_module(name, entry)
        cls = getattr(module, entry.target.rpartition(":")[2], None)
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise UserError(f"method '{name}': catalog target {entry.target} is not a subclass of "
                            f"cmtkd.methods.base.Method")
        _LOADED[key] = cls
    return _LOADED[key]


def method_names() -> list[str]:
    return sorted(catalog())
