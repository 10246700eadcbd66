"""Two-process DDP training on the CPU (gloo) with a tiny model.

The test runs this file as a script: Lightning's DDP launcher starts the second process by re-running the
same command, which pytest's own command line could not do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from test_training_support import settings, tiny_drafter, tiny_fit, tiny_rows, tiny_target

from draftsmith.training.datamodule import DistillDataModule
from draftsmith.training.features import OnlineFeatures

REPO = Path(__file__).resolve().parents[1]
# 6 held-out rows in batches of 2: 3 validation batches, so one process also gets an empty padding batch
TRAIN = {
    "strategy": "ddp",
    "devices": 2,
    "max_epochs": 2,
    "checkpoint_every_n_steps": 2,
    "batch_size": 2,
    "val_fraction": 0.25,
}


def train_on_two_processes(out: Path) -> None:
    module = tiny_fit(out, settings(**TRAIN), drafter_fields={"share_lm_head": False})
    rank = module.trainer.global_rank
    torch.save(
        {
            "weights": module.drafter.state_dict(),
            "rank_accuracy": module.val_rank_accuracy,
            "world_size": module.trainer.world_size,
            "steps": module.trainer.global_step,
        },
        out / f"rank{rank}.pt",
    )


def test_ddp_two_processes_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # 18 training rows in batches of 2 = 9 batches; 4 per process per epoch (the odd one is dropped)
    assert ranks[0]["steps"] == ranks[1]["steps"] == 8
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name  # gradients were all-reduced
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()

    # validation summed hit counts over both processes: the same as one process over all held-out rows
    target = tiny_target()
    drafter = tiny_drafter(target, share_lm_head=False)
    drafter.load_state_dict(ranks[0]["weights"])
    datamodule = DistillDataModule(tiny_rows(), batch_size=2, val_fraction=0.25, max_length=64, pad_id=0)
    hits, n = 0, 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            out = drafter.loss(batch, OnlineFeatures()(target.model, batch, drafter.target_needs()))
            hits, n = hits + out.hits.double(), n + out.counts.double()
    expected = (hits / n[:, None]).float()
    for rank in ranks:
        torch.testing.assert_close(rank["rank_accuracy"], expected)


if __name__ == "__main__":
    train_on_two_processes(Path(sys.argv[1]))
