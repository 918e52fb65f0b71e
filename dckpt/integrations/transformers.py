"""dckpt for the Hugging Face Trainer: one changed line, verified checkpoints, exact resume.

    from dckpt.integrations.transformers import DckptTrainer
    trainer = DckptTrainer(model=model, args=args, train_dataset=ds, ...)   # was Trainer(...)
    trainer.train(resume_from_checkpoint=True)                            # or =path

A subclass, not a callback: a callback is called after Trainer has written its own files
and never when Trainer loads them, so it could add a dckpt checkpoint but not replace the
pickled optimizer.pt / scheduler.pt / rng_state*.pth, choose which checkpoint a resume
uses, or verify what is loaded. The subclass overrides only Trainer's save and load hooks.

What a checkpoint folder holds, `output_dir/checkpoint-<global_step>/` as Trainer names it:
- what Trainer's save_model writes (config.json, model.safetensors, tokenizer files):
  `AutoModelForX.from_pretrained(folder)` works as on Trainer's own checkpoints;
- trainer_state.json, as Trainer writes it (global step, log history, best checkpoint);
- dckpt/: a dckpt checkpoint of the model, optimizer, scheduler, grad scaler and every
  rank's RNG streams, written collectively by every rank and committed last. No pickle.
  The model's tensors are not written a second time: dckpt/ hard-links model.safetensors
  and its chunks point into it, after the header (an incremental save against that file,
  dckpt/engine/filebase.py; every shared byte checked before the commit and on load).
The dckpt/ manifest is the commit marker: resume_from_checkpoint=True takes the newest
folder with a committed dckpt/, so a folder a crash left half written is never resumed
from. save_total_limit rotation (with the best checkpoint kept under load_best_model_at_end)
runs only after the commit.

Resume follows Trainer's own order: weights before accelerator.prepare, optimizer and
scheduler after, RNG streams after the resumed epoch's batches were skipped; the data order
comes from accelerate's seedable sampler (seed, epoch) as in Trainer. Every byte read is
verified against the manifest. A folder written by Trainer itself (no dckpt/) still resumes
through Trainer's own code.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..distributed import collective as dist
from ..engine import checkpoint
from ..engine.filebase import FileBase
from ..state import rng
from ..errors import CheckpointNotFoundError
from ..format import tree as treecodec
from ..format.manifest import MANIFEST_NAME
from ..storage.local import DEFAULT_CHUNK_SIZE

log = logging.getLogger("dckpt")

DCKPT_DIR = "dckpt"  # inside checkpoint-<step>/
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-([0-9]+)$")


def committed_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-<step> folders under `output_dir` whose dckpt checkpoint is committed,
    oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / DCKPT_DIR / MANIFEST_NAME).is_file()]
    return [p for _, p in sorted(found)]


def _detach_weights(folder: Path) -> None:
    """Before Trainer writes a checkpoint folder again (the same step saved twice): unlink
    its weights files that a committed dckpt/ shares, so that save_model writes new files
    instead of truncating the ones that checkpoint points into."""
    for p in folder.glob("*.safetensors") if folder.is_dir() else ():
        try:
            if p.lstat().st_nlink > 1:
                p.unlink()
        except FileNotFoundError:
            pass


def _is_dckpt(folder) -> bool:
    return folder is not None and (Path(folder) / DCKPT_DIR / MANIFEST_NAME).is_file()


class _SaveOnSignal(TrainerCallback):
    """save_on=: at the optimizer step every rank agreed on (dckpt/manager/preemption.py),
    Trainer saves a checkpoint and stops; DckptTrainer.train then exits."""

    def __init__(self, preemption):
        self.preemption = preemption

    def on_step_end(self, args, state, control, **kwargs):
        if self.preemption.due(state.global_step):
            control.should_save = True
            control.should_training_stop = True
        return control


class DckptTrainer(Trainer):
    """transformers.Trainer whose checkpoints are dckpt checkpoints (see the module
    docstring). dckpt_options: keyword arguments for dckpt.save (compression, threads)."""

    def __init__(self, *args, dckpt_options: dict | None = None, save_on=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dckpt_options = dict(dckpt_options or {})
        self.preemption = None
        if save_on is not None:
            from ..manager.preemption import Preemption
            self.preemption = Preemption.of(save_on)
            self.preemption.install()
            self.add_callback(_SaveOnSignal(self.preemption))

    # ---- what is saved ----------------------------------------------------------------
    def _components(self) -> dict:
        state = {"model": self.model}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer
        if self.lr_scheduler is not None:
            state["scheduler"] = self.lr_scheduler
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler
        return state

    # Trainer's pickle writers: their state goes into the dckpt checkpoint instead.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        pass

    def _save_scaler(self, output_dir: str) -> None:
        pass

    def _save_rng_state(self, output_dir: str) -> None:
        pass

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint (weights, config, trainer_state.json), then the dckpt
        checkpoint committed, then rotation: a failed save never costs an older one."""
        limit = self.args.save_total_limit
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            _detach_weights(folder)
        self.args.save_total_limit = None  # rotation waits for the commit below
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        options = dict(self.dckpt_options)
        # The model's tensors are shared with the weights file(s) save_model just wrote
        # (hard link), not written twice: see dckpt/engine/filebase.py.
        base = FileBase(folder, "*.safetensors",
                        options.get("chunk_size", DEFAULT_CHUNK_SIZE),
                        name_of=lambda n: f"model/{n}", fsync=options.get("fsync", True))
        checkpoint.save(self._components(), folder / DCKPT_DIR, overwrite=True,
                        rank_state={"rng": rng.capture(own_device_only=dist.active())},
                        counters={"global_step": self.state.global_step,
                                  "epoch": self.state.epoch},
                        base=base, **options)
        if self.args.should_save and limit is not None:
            from transformers.trainer_utils import rotate_checkpoints
            rotate_checkpoints(output_dir=str(run_dir),
                               save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint,
                               use_mtime=True)

    # ---- which checkpoint a resume uses -----------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """Trainer.train; resume_from_checkpoint=True takes the newest checkpoint-<step>
        whose dckpt checkpoint is committed (CheckpointNotFoundError if there is none)."""
        if resume_from_checkpoint is True:
            found = committed_checkpoints(self.args.output_dir)
            if not found:
                raise CheckpointNotFoundError(
                    f"no committed dckpt checkpoint (checkpoint-<step>/{DCKPT_DIR}/"
                    f"{MANIFEST_NAME}) under {self.args.output_dir}: start without "
                    "resume_from_checkpoint, or pass the folder of a Trainer checkpoint")
            resume_from_checkpoint = str(found[-1])
        out = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                            ignore_keys_for_eval=ignore_keys_for_eval)
        if self.preemption is not None and self.preemption.target is not None:
            log.warning("dckpt: preemption checkpoint of step %d committed; exiting with %d",
                        self.preemption.target, self.preemption.code)
            raise SystemExit(self.preemption.code)
        return out

    # ---- loading -------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not _is_dckpt(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.model if model is None else model
        checkpoint.load(Path(resume_from_checkpoint) / DCKPT_DIR,
                        into={"model": getattr(model, "module", model)}, keys=["model"])

    def _load_optimizer_and_scheduler(self, ckpt) -> None:
        if not _is_dckpt(ckpt):
            return super()._load_optimizer_and_scheduler(ckpt)
        state = {k: v for k, v in self._components().items() if k in ("optimizer", "scheduler")}
        checkpoint.load(Path(ckpt) / DCKPT_DIR, into=state, keys=list(state))

    def _load_scaler(self, ckpt) -> None:
        if not _is_dckpt(ckpt):
            return super()._load_scaler(ckpt)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            checkpoint.load(Path(ckpt) / DCKPT_DIR, into={"scaler": scaler}, keys=["scaler"])

    def _load_rng_state(self, ckpt) -> None:
        if not _is_dckpt(ckpt):
            return super()._load_rng_state(ckpt)
        r = dist.rank()
        m = checkpoint.read_manifest(Path(ckpt) / DCKPT_DIR, rank=r)
        if r >= m.world_size:
            log.warning("dckpt: rank %d did not exist in the %d-rank checkpoint %s: its RNG "
                        "streams were not restored", r, m.world_size, ckpt)
            return
        rng.restore(treecodec.decode(m.ranks[r]["rng"]))
