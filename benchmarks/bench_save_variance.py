"""The spread of save and load times outside a warm loop (issue 27): plain write,
torch.save, safetensors, dckpt.save and CheckpointManager.save, back to back, interleaved
with each other's saves and loads, and right after a training step; /dev/shm and disk
(fsync). Reports p10/p50/p90 wall seconds and user/kernel CPU seconds per GB per system,
and the goals as ratios; writes variance.json and variance.md (a docs section) under --out.

    python benchmarks/bench_save_variance.py [--quick] [--repeats 12] [--regimes disk,shm]
        [--workloads transformer-800MB-fp32] [--out bench-results]

The same as `python -m dckpt bench --variance ...`. Wall times need a quiet machine; CPU
times per GB hold under load.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dckpt.cli import main  # noqa: E402

if __name__ == "__main__":
    # As if run as `python -m dckpt bench --variance ...`, which the results then quote.
    sys.argv[1:] = ["bench", "--variance", *sys.argv[1:]]
    sys.exit(main(sys.argv[1:]))
