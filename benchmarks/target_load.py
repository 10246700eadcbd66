"""Load time of the embedded target: the first load (GGUF conversion into an empty cache) vs a cached reload.

.venv/bin/python benchmarks/target_load.py
"""

from __future__ import annotations

import os
import tempfile
import time


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DRAFTSMITH_CACHE"] = cache  # read by drafters.target.cache_root at every load
        from draftsmith.drafters.target import load_target

        times = []
        for _ in range(2):
            began = time.perf_counter()
            load_target("smollm2-135m-instruct")
            times.append(time.perf_counter() - began)
    print(f"first load (GGUF conversion): {times[0]:.1f} s")
    print(f"cached reload:                {times[1]:.2f} s  ({times[0] / times[1]:.0f}x faster)")


if __name__ == "__main__":
    main()
