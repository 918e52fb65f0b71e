"""Save/load benchmark: dckpt vs torch.save, safetensors, DCP, accelerate, and the
machine's limits, durable on disk and in /dev/shm. Same as `python -m dckpt bench`.

    python benchmarks/save_load.py --quick          # < 2 minutes
    python benchmarks/save_load.py --docs docs/BENCHMARKS.md
"""
import sys

from dckpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
