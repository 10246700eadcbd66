"""The distilled dataset as padded, length-bucketed batches with a seeded held-out split."""

from __future__ import annotations

import warnings
from typing import Any

import datasets
import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.training.sampling import BucketBatchSampler

REQUIRED_COLUMNS = ("input_ids", "loss_mask")

# torchdata calls torch.set_vital, deprecated in torch, on every new loader iterator: nothing for a user to act on
warnings.filterwarnings("ignore", r"'set_vital' is deprecated", UserWarning, r"torchdata\.")


class DistilledRows(Dataset):
    """Rows of the distilled dataset by their index in it, truncated to ``max_length`` tokens."""

    def __init__(self, table: datasets.Dataset, rows: list[int], max_length: int) -> None:
        self.table = table
        self.rows = rows
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = self.rows[position]
        record = self.table[row]
        return {
            "row": row,
            "input_ids": record["input_ids"][: self.max_length],
            "loss_mask": record["loss_mask"][: self.max_length],
        }


class PadCollator:
    """Right-pads a list of rows into ``input_ids``/``attention_mask``/``loss_mask``/``row`` tensors."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:  # an evaluation padding batch (see BucketBatchSampler): one row that counts nothing
            rows = [{"row": 0, "input_ids": [self.pad_id, self.pad_id], "loss_mask": [0, 0]}]
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            loss_mask[i, :n] = torch.as_tensor(r["loss_mask"], dtype=torch.long)
        rows_index = torch.as_tensor([r["row"] for r in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, "row": rows_index}


def held_out_split(n_rows: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of row indices into (train, validation); at least one training row."""
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(int(round(n_rows * val_fraction)), n_rows - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


class DistillDataModule(L.LightningDataModule):
    """Train/validation loaders over a distilled dataset (columns ``input_ids``, ``loss_mask``)."""

    def __init__(
        self,
        table: datasets.Dataset,
        *,
        batch_size: int,
        val_fraction: float,
        max_length: int,
        pad_id: int,
        seed: int = 0,
        sort_chunk: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise DraftsmithError(
                f"the distilled dataset lacks column(s) {', '.join(missing)}: rebuild it with `python -m data`"
            )
        if len(table) < 2:
            raise DraftsmithError(f"the distilled dataset has {len(table)} row(s); raise data.limit to at least 2")
        self.table = table
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_id = pad_id
        self.seed = seed
        self.sort_chunk = sort_chunk
        self.num_workers = num_workers
        self.train_rows, self.val_rows = held_out_split(len(table), val_fraction, seed)
        lengths = pc.list_value_length(table.data.column("input_ids")).to_pylist()
        self.lengths = [min(n, max_length) for n in lengths]

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _sampler(self, rows: list[int], *, train: bool) -> BucketBatchSampler:
        num_replicas, rank = self._replicas()
        trainer = self.trainer
        return BucketBatchSampler(
            [self.lengths[r] for r in rows],
            self.batch_size,
            shuffle=train,
            seed=self.seed,
            sort_chunk=self.sort_chunk,
            num_replicas=num_replicas,
            rank=rank,
            # the epoch Lightning hands samplers to set_epoch; unlike trainer.current_epoch it is already the next
            # one while a run resumed from an epoch-end checkpoint builds its loader
            epoch_source=None if trainer is None else (lambda: trainer.fit_loop.epoch_progress.current.processed),
        )

    def target_token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each token id ``[vocab_size]`` is target-written (``loss_mask`` 1) in the training rows: what a
        draft vocabulary is chosen from (the held-out rows stay out of it, as they stay out of training)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        train = self.table.select(self.train_rows).with_format("arrow")
        for part in train.iter(batch_size=1024):
            ids = pc.list_flatten(part["input_ids"]).to_numpy()
            written = pc.list_flatten(part["loss_mask"]).to_numpy() == 1
            counts += np.bincount(ids[written], minlength=vocab_size)[:vocab_size]
        return torch.from_numpy(counts)

    def train_batches_per_epoch(self) -> int:
        """Batches each process trains on per epoch."""
        return len(self._sampler(self.train_rows, train=True))

    def train_dataloader(self) -> StatefulDataLoader:
        """Lightning checkpoints its position (``state_dict``) and a resumed run continues at the next batch."""
        return StatefulDataLoader(
            DistilledRows(self.table, self.train_rows, self.max_length),
            batch_sampler=self._sampler(self.train_rows, train=True),
            collate_fn=PadCollator(self.pad_id),
            num_workers=self.num_workers,
            # a private generator keeps DataLoader's per-epoch seed draw off the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return []
        return DataLoader(
            DistilledRows(self.table, self.val_rows, self.max_length),
            batch_sampler=self._sampler(self.val_rows, train=False),
            collate_fn=PadCollator(self.pad_id),
            num_workers=self.num_workers,
        )
