"""Peak extra memory of dckpt.export, in fresh processes (tests/test_export.py, docs/export.md).

    python export_memory.py make DIR TOTAL_MB       # DIR/ckpt: TOTAL_MB of 2 MB float32 tensors
    python export_memory.py measure DIR SHARD_MB    # -> JSON {"peak_extra": bytes, ...}

measure: imports and warms up on a tiny checkpoint, resets the peak RSS to the current RSS
(/proc/self/clear_refs), exports DIR/ckpt with SHARD_MB shards, and reports how far the
peak rose above the RSS before the export.
"""
import json
import sys
from pathlib import Path

import torch

import dckpt


def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


mode, d = sys.argv[1], Path(sys.argv[2])
if mode == "make":
    n = int(sys.argv[3]) // 2
    dckpt.save({"model": {f"layer{i}.weight": torch.randn(512, 1024) for i in range(n)}},
               d / "ckpt")
    dckpt.save({"model": {"w": torch.randn(4, 4)}}, d / "tiny")
else:
    shard_mb = int(sys.argv[3])
    dckpt.export(d / "tiny", d / "warm", overwrite=True)  # imports, first allocations
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = rss("VmRSS:")
    r = dckpt.export(d / "ckpt", d / f"hf-{shard_mb}", max_shard_size=f"{shard_mb}MB",
                     overwrite=True)
    print(json.dumps({"peak_extra": rss("VmHWM:") - before, "total": r.bytes,
                      "shard": shard_mb * 10**6, "files": len(r.files)}))
