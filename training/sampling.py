"""Length-bucketed batches that resume mid-epoch at the exact batch where a checkpoint was taken.

Order is a pure function of (seed, epoch), so a resumed run replays the same epoch and skips the batches
the checkpoint says were already trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of row positions, rows of similar length together to waste little padding.

    The epoch comes from ``set_epoch`` or, when given, from ``epoch_source()`` (the trainer's epoch).

    Training order: shuffle rows, cut them into chunks of ``sort_chunk`` batches, sort each chunk by length,
    cut it into batches, shuffle the batches. With ``num_replicas > 1`` each process takes every
    ``num_replicas``-th batch and all processes run the same number of steps (collectives need that):
    training drops the tail; evaluation keeps every row and pads with empty batches instead, which the
    collator turns into one fully masked row, so totals summed across processes stay exact.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        sort_chunk: int = 64,
        num_replicas: int = 1,
        rank: int = 0,
        epoch_source: Callable[[], int] | None = None,
    ) -> None:
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.sort_chunk = sort_chunk
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.epoch_source = epoch_source
        self._resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = torch.argsort(self.lengths, stable=True)
            return [order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator)
        chunk = self.batch_size * self.sort_chunk
        batches = []
        for start in range(0, n, chunk):
            rows = order[start : start + chunk]
            rows = rows[torch.argsort(self.lengths[rows], stable=True)]
            batches += [rows[i : i + self.batch_size].tolist() for i in range(0, len(rows), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled]

    def _my_batches(self) -> list[list[int]]:
        batches = self._all_batches()
        if self.shuffle:
            batches = batches[: len(batches) // self.num_replicas * self.num_replicas]
        else:
            batches += [[]] * (-len(batches) % self.num_replicas)
        return batches[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        n_batches = -(-len(self.lengths) // self.batch_size)
        if self.shuffle:
            return n_batches // self.num_replicas
        return -(-n_batches // self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        # Read at the first batch, not when iter() is called: a resuming trainer calls iter() before it
        # restores its epoch counter (and Lightning's set_epoch reaches plain samplers only).
        if self.epoch_source is not None:
            self.epoch = self.epoch_source()
        batches = self._my_batches()
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            skip = self._resume_at[1]
        self._resume_at = None
        yield from batches[skip:]

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration over ``epoch`` start after its first ``batches_done`` batches."""
        self._resume_at = (epoch, batches_done)


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints and restores (it implements ``state_dict``/``load_state_dict``).

    ``progress()`` returns the trainer's (epoch, batches trained this epoch). The position is read from it
    rather than counted here: the fit loop fetches one batch ahead, so counting yields would skip a batch on
    resume.
    """

    def __init__(
        self, dataset: Any, batch_sampler: BucketBatchSampler, progress: Callable[[], tuple[int, int]], **kwargs: Any
    ) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches_done = self._progress()
        return {"epoch": int(epoch), "batches_done": int(batches_done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.resume_at(int(state["epoch"]), int(state["batches_done"]))
