"""Algorithm name -> module class. Drives the config choices, the GUI dropdown
and file loading (each class recognises its own keys)."""

from __future__ import annotations

from .base import AdapterModule
from .loha import LoHaModule
from .lora import LoRAModule

# "locon" is LoRA placed on the conv layers too; files do not tell them apart
# except by which layers they cover.
ALGORITHMS: dict[str, type[AdapterModule]] = {
    "lora": LoRAModule,
    "locon": LoRAModule,
    "loha": LoHaModule,
}
ALGORITHMS_WITH_CONV = frozenset({"locon", "loha"})
FILE_MODULE_CLASSES: tuple[type[AdapterModule], ...] = (LoRAModule, LoHaModule)


def module_class_for_keys(suffixes: set[str]) -> type[AdapterModule] | None:
    for cls in FILE_MODULE_CLASSES:
        if cls.recognises(suffixes):
            return cls
    return None
