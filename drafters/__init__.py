"""The models: the Drafter interface, the trained drafter kinds, the target loader.

Importing the package registers every trained kind, so `Drafter.from_pretrained` can load any export.
"""

from drafters import amphista, medusa  # noqa: F401 - importing a kind registers it
from drafters.base import DecodeState, Draft, Drafter, DrafterConfig, TargetNeeds, drafter_class, register
from drafters.errors import DraftsmithError
from drafters.target import Target, TargetIdentity, load_target

__all__ = [
    "DecodeState",
    "Draft",
    "Drafter",
    "DrafterConfig",
    "DraftsmithError",
    "Target",
    "TargetIdentity",
    "TargetNeeds",
    "drafter_class",
    "load_target",
    "register",
]
