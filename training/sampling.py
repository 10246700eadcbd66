"""Length-bucketed batches whose order is a pure function of (seed, epoch).

Mid-epoch resume is torchdata's StatefulDataLoader's job (the datamodule wraps this sampler in one): it
records how many batches it yielded and fast-forwards this sampler past them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler


# Hand-written: transformers' DistributedLengthGroupedSampler shards rows, not batches, and pads by repeating rows.
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
        # Read here, not left to Lightning: its set_epoch reaches only ``loader.sampler`` and
        # ``loader.batch_sampler.sampler``, and comes after iter() has already set loader workers fetching.
        if self.epoch_source is not None:
            self.epoch = self.epoch_source()
        yield from self._my_batches()
