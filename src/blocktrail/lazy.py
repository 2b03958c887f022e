"""A package's names loaded from their modules on first use (PEP 562), so that importing one
light module of the package does not load what the others need."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, namespace: dict[str, Any],
               where: dict[str, str]) -> Callable[[str], Any]:
    """The package's ``__getattr__``: ``name`` comes from the module ``where[name]`` of
    ``package``, and is kept in ``namespace`` (the package's globals) once loaded."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    return __getattr__
