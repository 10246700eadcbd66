"""Lightning training of drafters against a frozen target: module, data, callbacks, export, publish.

`training.pipeline.run(cfg)` is the whole `python train.py` run; the pieces are usable on their own:

* `module.DrafterModule`: the frozen target (a submodule: strategies place and shard it; never optimised,
  never checkpointed) plus the trainable drafter; AdamW with warmup + cosine per optimizer step.
* `datamodule.DistillDataModule`: padded, length-bucketed batches with a seeded held-out split; its train
  loader checkpoints its position, so `resume=true` continues at the exact batch (and RNG state) it stopped.
* `lora`: Medusa-2's LoRA adapters on the target (peft) and its self-distillation KL; `DrafterModule` uses it
  when the drafter's config asks for an adapted target.
* `callbacks.AcceptanceEval`: real speculative decoding after each epoch on rank 0; keeps the best export.
* `export.write_export` / `publish.publish`: the export folder (docs/design.md) and its upload to the Hub.
* `strategies.trainer_arguments`: `recipes/trainer/*.yaml` -> Trainer arguments (single device, DDP, ZeRO).
"""
