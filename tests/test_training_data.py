"""DistillDataModule and its batch sampler: padding, truncation, bucketing, split, sharding, resume."""

from __future__ import annotations

import pytest
import torch
from test_training_support import tiny_rows

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.training.datamodule import DistillDataModule, PadCollator, held_out_split
from draftsmith.training.sampling import BucketBatchSampler


def test_batches_are_padded_masked_and_truncated():
    rows = tiny_rows(10)
    module = DistillDataModule(rows, batch_size=3, val_fraction=0.0, max_length=20, pad_id=0)
    for batch in module.train_dataloader():
        assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["loss_mask"].shape
        assert batch["input_ids"].shape[1] <= 20
        for i, row in enumerate(batch["row"].tolist()):
            n = min(len(rows[row]["input_ids"]), 20)
            assert batch["attention_mask"][i].sum() == n
            assert batch["input_ids"][i, :n].tolist() == rows[row]["input_ids"][:n]
            assert batch["loss_mask"][i, :n].tolist() == rows[row]["loss_mask"][:n]
            assert batch["loss_mask"][i, n:].sum() == 0 and batch["input_ids"][i, n:].eq(0).all()


def test_split_is_seeded_disjoint_and_complete():
    train, val = held_out_split(100, 0.1, seed=3)
    assert (train, val) == held_out_split(100, 0.1, seed=3)
    assert held_out_split(100, 0.1, seed=4)[1] != val
    assert len(val) == 10 and sorted(train + val) == list(range(100))


def test_bucketing_pads_less_than_random_batches():
    lengths = torch.randint(5, 500, (400,), generator=torch.Generator().manual_seed(0)).tolist()

    def padding(sampler):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in sampler)

    bucketed = BucketBatchSampler(lengths, 8, shuffle=True, sort_chunk=16)
    unsorted = BucketBatchSampler(lengths, 8, shuffle=True, sort_chunk=1)  # a chunk of one batch: no bucketing
    assert padding(bucketed) < 0.5 * padding(unsorted)
    assert sorted(i for b in bucketed for i in b) == list(range(400))


def test_epochs_reshuffle_deterministically():
    sampler = BucketBatchSampler(list(range(50)), 4, shuffle=True, seed=1)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_processes_get_disjoint_equal_shares():
    lengths = list(range(1, 43))
    shards = [list(BucketBatchSampler(lengths, 4, shuffle=True, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(BucketBatchSampler(lengths, 4, shuffle=True, num_replicas=2))
    assert not set(i for b in shards[0] for i in b) & set(i for b in shards[1] for i in b)
    val = [list(BucketBatchSampler(lengths, 4, shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(i for shard in val for b in shard for i in b) == list(range(42))  # validation keeps every row
    assert len(val[0]) == len(val[1]) == 6 and val[1][-1] == []  # 11 batches, padded with an empty one


def test_an_empty_padding_batch_counts_nothing():
    batch = PadCollator(pad_id=5)([])
    assert batch["input_ids"].tolist() == [[5, 5]] and batch["loss_mask"].sum() == 0


def test_train_loader_resumes_after_the_batches_it_yielded():
    def loader():
        module = DistillDataModule(tiny_rows(24), batch_size=4, val_fraction=0.0, max_length=64, pad_id=0, seed=2)
        return module.train_dataloader()

    full = [b["row"].tolist() for b in loader()]
    killed = iter(first := loader())
    done = [next(killed)["row"].tolist() for _ in range(2)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert done + [b["row"].tolist() for b in resumed] == full
    assert [b["row"].tolist() for b in resumed] == full  # only the resumed pass skips


def test_bad_data_is_a_clear_error():
    rows = tiny_rows(4).remove_columns("loss_mask")
    with pytest.raises(DraftsmithError, match="loss_mask"):
        DistillDataModule(rows, batch_size=2, val_fraction=0.0, max_length=8, pad_id=0)
    with pytest.raises(DraftsmithError, match="data.limit"):
        DistillDataModule(tiny_rows(1), batch_size=2, val_fraction=0.0, max_length=8, pad_id=0)
