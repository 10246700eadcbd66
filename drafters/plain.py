"""The ``ar`` drafter: proposes nothing, so the engine does plain autoregressive decoding (the baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from draftsmith.drafters.base import DecodeState, Draft, Drafter, DrafterConfig, register


@dataclass
class PlainConfig(DrafterConfig):
    kind: ClassVar[str] = "ar"


@register
class PlainDrafter(Drafter):
    config_class = PlainConfig

    def __init__(self, config: PlainConfig | None = None) -> None:
        super().__init__(config or PlainConfig())

    def max_draft_nodes(self) -> int:
        return 0

    def propose(self, state: DecodeState) -> Draft:
        return Draft.empty()
