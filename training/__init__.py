"""Lightning training of drafters against a frozen target: module, data, callbacks, export, publish.

`training.pipeline.run(cfg)` is the whole `python train.py` run; the pieces are usable on their own.
"""
