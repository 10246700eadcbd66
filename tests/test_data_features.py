"""The feature cache gives what the online computation gives, for the same padded batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from draftsmith.data import FeatureCache, build_distilled, load_distilled, target_features, write_feature_cache
from draftsmith.drafters.base import TargetNeeds
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import Target


def right_pad(rows: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def dataset_dir(tiny_target: Target, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("features")
    questions = ["Hi.", "Tell me a long story about a cat and a dog.", "Why?", "List primes.", "Sum 2 and 2."]
    (root / "q.jsonl").write_text("".join(json.dumps({"id": i, "turns": [q]}) + "\n" for i, q in enumerate(questions)))
    cfg = {"prompts": str(root / "q.jsonl"), "max_new_tokens": 6, "shard_rows": 2, "out": str(root / "data")}
    return build_distilled(cfg, tiny_target)


def test_cache_equals_online_features(tiny_target: Target, dataset_dir: Path) -> None:
    needs = TargetNeeds(hidden_layers=(0, 1, -1))
    folder = write_feature_cache(dataset_dir, tiny_target, needs, topk=4)
    cache = FeatureCache(folder)
    assert len(cache) == 5
    rows = load_distilled(dataset_dir)["input_ids"]
    batch = [3, 1, 4]  # spans two shards, unequal lengths
    width = max(len(rows[i]) for i in batch) + 3
    ids, mask = right_pad([rows[i] for i in batch], width, tiny_target.tokenizer.pad_token_id)
    online = target_features(tiny_target.model, ids, mask, needs, topk=4)
    cached = cache.batch(batch, pad_to=width)
    assert set(cached) == set(online) == {"hidden", "topk_logprobs", "topk_ids"}
    for layer in needs.hidden_layers:
        assert cached["hidden"][layer].shape == online["hidden"][layer].shape == (3, width, 32)
        torch.testing.assert_close(cached["hidden"][layer], online["hidden"][layer], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached["topk_logprobs"], online["topk_logprobs"], rtol=1e-4, atol=1e-5)
    assert torch.equal(cached["topk_ids"], online["topk_ids"])
    assert not torch.equal(online["hidden"][0], online["hidden"][-1])
    assert cache.batch(batch)["hidden"][0].shape[1] == width - 3  # default: the longest row


def test_online_features_ignore_padding_side(tiny_target: Target, dataset_dir: Path) -> None:
    rows = load_distilled(dataset_dir)["input_ids"][:2]
    needs = TargetNeeds(hidden_layers=(-1,), logits=True)
    width = max(map(len, rows))
    right_ids, right_mask = right_pad(rows, width, 0)
    left_ids, left_mask = right_ids.clone(), right_mask.clone()
    for i, row in enumerate(rows):  # the same rows, padded on the left
        left_ids[i] = torch.cat([torch.zeros(width - len(row), dtype=torch.long), torch.tensor(row)])
        left_mask[i] = torch.cat(
            [torch.zeros(width - len(row), dtype=torch.long), torch.ones(len(row), dtype=torch.long)]
        )
    right = target_features(tiny_target.model, right_ids, right_mask, needs)
    left = target_features(tiny_target.model, left_ids, left_mask, needs)
    for i, row in enumerate(rows):
        n = len(row)
        torch.testing.assert_close(right["logits"][i, :n], left["logits"][i, width - n :], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(right["hidden"][-1][i, :n], left["hidden"][-1][i, width - n :], rtol=1e-4, atol=1e-5)
    assert right["logits"].shape[-1] == len(tiny_target.tokenizer)


def test_full_logits_are_not_cached(tiny_target: Target, dataset_dir: Path) -> None:
    with pytest.raises(DraftsmithError, match="use data.features.topk"):
        write_feature_cache(dataset_dir, tiny_target, TargetNeeds(logits=True))
    with pytest.raises(DraftsmithError, match="not a feature cache"):
        FeatureCache(dataset_dir)
