"""Algorithm name -> module class, resolved from the torch-free registry in
`networks.algorithms` (which the config schema and the GUI read instead)."""

from __future__ import annotations

import importlib
from functools import cache

from .algorithms import ALGORITHMS, Algorithm, file_algorithm
from .base import AdapterModule

ALGORITHMS_WITH_CONV = frozenset(a.name for a in ALGORITHMS.values() if a.targets_conv)


@cache
def module_class(name: str) -> type[AdapterModule]:
    """The class implementing algorithm `name` (imported on first use)."""
    module_name, _, class_name = ALGORITHMS[name].module_class.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not issubclass(cls, AdapterModule):
        raise TypeError(f"{ALGORITHMS[name].module_class} is not an AdapterModule")
    return cls


def algorithm_for_keys(suffixes: set[str]) -> Algorithm | None:
    return file_algorithm(suffixes)


def module_class_for_keys(suffixes: set[str]) -> type[AdapterModule] | None:
    """The class that loads a file module with these tensor suffixes."""
    algorithm = file_algorithm(suffixes)
    return None if algorithm is None else module_class(algorithm.name)
