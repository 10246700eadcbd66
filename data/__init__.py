"""Distillation data: prompt sources, prompt synthesis, target regeneration, sharded store, feature cache."""

from draftsmith.data.build import build_distilled
from draftsmith.data.config import DataConfig
from draftsmith.data.features import FeatureCache, target_features, write_feature_cache
from draftsmith.data.prompts import Conversation, load_prompts
from draftsmith.data.store import load_distilled, read_manifest

__all__ = [
    "Conversation",
    "DataConfig",
    "FeatureCache",
    "build_distilled",
    "load_distilled",
    "load_prompts",
    "read_manifest",
    "target_features",
    "write_feature_cache",
]
