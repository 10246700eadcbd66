"""The models: the Drafter interface, every drafter kind (trained and training-free), the target loader.

Importing the package imports every module in it, and each kind registers itself on import, so
`drafter_class(kind)` and `Drafter.from_pretrained` know every kind without a hand-written list.
"""

import importlib
import pkgutil

from draftsmith.drafters.base import DecodeState, Draft, Drafter, DrafterConfig, LossOutput, TargetNeeds, drafter_class
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target, TargetIdentity, load_target

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DecodeState",
    "Draft",
    "Drafter",
    "DrafterConfig",
    "DraftsmithError",
    "LossOutput",
    "Target",
    "TargetIdentity",
    "TargetNeeds",
    "drafter_class",
    "load_target",
]
