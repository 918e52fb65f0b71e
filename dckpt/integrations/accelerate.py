"""dckpt for Hugging Face accelerate: keep the accelerate loop, get dckpt checkpoints.

    accelerator = DckptAccelerator(...)      # instead of Accelerator(...); or install(accelerator)
    accelerator.save_state()                 # same arguments and semantics as accelerate's
    accelerator.load_state()

What is saved: every prepared model, optimizer and scheduler, the position of every prepared
data loader (exact, mid-epoch), the GradScaler, objects given to register_for_checkpointing,
accelerator.step, and each process's RNG streams, collectively from every process.

accelerate's conventions hold: an explicit output_dir, or with
ProjectConfiguration(automatic_checkpoint_naming=True) project_dir/checkpoints/checkpoint_<n>,
n = project_configuration.iteration, kept to total_limit (the oldest ones are removed only
after the new one is committed), and nothing else in that folder, so accelerate's own listing
(os.listdir, sorted by the number in each name) works on it; load_state() without a directory
loads the newest one; save/load pre-hooks are called as accelerate calls them; invalid
registrations raise accelerate's errors. A folder written by accelerate's own save_state is
read too (see accelerate_folder.py), so a run moves to dckpt by changing one line.

DeepSpeed, Megatron-LM and XLA keep their own checkpoint engines: there accelerate's own
save_state/load_state run unchanged.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import time
from pathlib import Path
from types import MethodType

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..engine import checkpoint
from ..storage import commit
from ..distributed import collective as dist
from ..state import rng
from ..errors import CheckpointNotFoundError, LockError
from ..format import tree as treecodec
from ..format.layout import TMP_MARK, is_staging, staging_dir
from ..format.manifest import MANIFEST_NAME
from ..manager import ResumeReport
from ..manager.manager import load_step, resumed
from . import accelerate_folder
from .loader_position import LoaderState, track_position

log = logging.getLogger("dckpt")

_OWN_ENGINES = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)
CHECKPOINTS = "checkpoints"  # accelerate's sub-directory of project_dir for automatic naming
_AUTO_NAME = re.compile(r"^checkpoint_([0-9]+)$")  # accelerate's name for checkpoint n there
_MAP_LOCATIONS = (None, "cpu", "on_device")  # what accelerate's load_state accepts


# ---- the state of an Accelerator as checkpoint components --------------------------------
class ModelWeights:
    """A model's weights as a component. Saving: the (hook-filtered) state dict accelerate
    would write. Loading: reads into the live parameters, then model.load_state_dict."""

    def __init__(self, model, weights: dict | None = None, **load_kwargs):
        self.model, self.weights, self.load_kwargs = model, weights, load_kwargs

    def state_dict(self) -> dict:
        return self.weights if self.weights is not None else self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state, **self.load_kwargs)


class AcceleratorCounters:
    """accelerator.step (the gradient-accumulation step accelerate restores on load)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def state_dict(self) -> dict:
        return {"step": int(self.accelerator.step)}

    def load_state_dict(self, state: dict) -> None:
        self.accelerator.step = int(state["step"])


def _name(kind: str, i: int) -> str:
    return kind if i == 0 else f"{kind}_{i}"


def _model_for_state(accelerator: Accelerator, model):
    # Sharded engines keep their wrapper (its state dict holds the shards); otherwise the bare
    # module, so the keys do not depend on DDP or torch.compile and a checkpoint loads on any
    # number of processes.
    if accelerator.distributed_type == DistributedType.FSDP:
        return model
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def components(accelerator: Accelerator, models: list | None = None,
               weights: list[dict] | None = None, load_kwargs: dict | None = None,
               unwrapped: bool = False) -> dict:
    """The checkpoint state of `accelerator`, in load order (the scaler before optimizers,
    as FSDP2 needs). models/weights: what remains after save/load pre-hooks; unwrapped:
    the models are _model_for_state's already."""
    models = list(accelerator._models) if models is None else models
    state: dict = {"accelerator": AcceleratorCounters(accelerator)}
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    for i, model in enumerate(models):
        w = weights[i] if weights is not None else None
        bare = model if unwrapped else _model_for_state(accelerator, model)
        state[_name("model", i)] = ModelWeights(bare, w, **(load_kwargs or {}))
    if weights is not None:  # a save hook may have left more weights than models
        for i in range(len(models), len(weights)):
            state[_name("model", i)] = ModelWeights(None, weights[i])
    for i, opt in enumerate(accelerator._optimizers):
        state[_name("optimizer", i)] = opt
    for i, sched in enumerate(accelerator._schedulers):
        state[_name("scheduler", i)] = sched
    for i, loader in enumerate(accelerator._dataloaders):
        state[_name("dataloader", i)] = LoaderState(loader)
    for i, obj in enumerate(accelerator._custom_objects):
        state[f"custom_{i}"] = obj
    return state


# ---- save ----------------------------------------------------------------------------------
def options(accelerator: Accelerator) -> dict:
    """dckpt's save/load options of this accelerator (compression, threads, fsync, verify)."""
    return getattr(accelerator, "_dckpt_options", None) or {}


def training_step(accelerator: Accelerator) -> int:
    """The optimizer steps taken: the largest step count a prepared optimizer keeps (what
    `dckpt verify` compares the recorded global step with); accelerator.step (which only
    accumulate() advances) when no optimizer keeps one. Recorded as the checkpoint's step."""
    counts: dict = {}
    for opt in accelerator._optimizers:
        for s in getattr(opt, "optimizer", opt).state.values():
            v = s.get("step") if isinstance(s, dict) else None
            if hasattr(v, "to_local"):
                v = v.to_local()
            if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_cpu:
                counts.setdefault("python", []).append(v.item())  # no device to sync
            elif isinstance(v, torch.Tensor) and v.numel() == 1:
                counts.setdefault(v.device, []).append(v.detach().reshape(()).double())
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                counts.setdefault("python", []).append(float(v))
    # One device sync per device, not one per parameter (capturable optimizers keep the
    # counts on the GPU).
    found = [max(v) if k == "python" else torch.stack(v).max().item() for k, v in counts.items()]
    return int(max(found)) if found else int(accelerator.step)


def _numbered(root: Path) -> dict[int, str]:
    """accelerate's automatic names under root: n -> what checkpoint_<n> holds ("dckpt", a
    committed checkpoint; "accelerate", one written by accelerate's own save_state; "other",
    neither). Read by rank 0 and broadcast, so that every process decides alike."""
    found: dict[int, str] = {}
    if dist.rank() == 0 and root.is_dir():
        for p in root.iterdir():
            m = _AUTO_NAME.match(p.name)
            if m and p.is_dir():
                found[int(m.group(1))] = ("dckpt" if (p / MANIFEST_NAME).is_file() else
                                          "accelerate" if accelerate_folder.looks_like(p) else
                                          "other")
    return {int(n): k for n, k in dist.broadcast_json(
        {str(n): k for n, k in found.items()}, 0, None, "checkpoint listing").items()}


class _RootLock:
    """One saving process per project_dir/checkpoints: an advisory flock on the directory
    itself. A lock file beside the checkpoints would be one more entry in accelerate's
    listing, which takes every entry for a numbered checkpoint."""

    def __init__(self, root: Path):
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise LockError(f"{root} is being written by another process's save_state: two "
                            "runs must not share a project_dir (give each its own)") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _begin_automatic(accelerator: Accelerator) -> tuple[Path, str | None, "_RootLock | None"]:
    """Checks and locks for a save under automatic naming; collective. Returns the target,
    the checkpoint to share unchanged chunks with, and (rank 0) the held lock."""
    pc = accelerator.project_configuration
    root = Path(accelerator.project_dir) / CHECKPOINTS  # a relative project_dir: as accelerate
    it = int(pc.iteration)
    target = root / f"checkpoint_{it}"
    lock = failure = None
    if dist.rank() == 0:
        try:
            commit.make_dirs(root)
            lock = _RootLock(root)
            for p in root.iterdir():  # what a crashed save or deletion left behind
                if is_staging(p.name):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        except Exception as e:
            failure = e
            if lock is not None:
                lock.release()
                lock = None
    dist.raise_if_any_failed(failure, None, "save_state")
    try:
        found = _numbered(root)
        newest = max(found, default=None)
        if it in found:
            raise ValueError(
                f"Checkpoint directory {target} ({it}) already exists. Please manually override "
                "`self.save_iteration` with what iteration to start with.")
        if newest is not None and it < newest:
            # accelerate would write it, then take it for the oldest: total_limit deletes it
            # first and load_state() never picks it.
            raise ValueError(
                f"save_state would write {target.name}, but {root} already holds "
                f"checkpoint_{newest}: a lower number counts as older, so load_state() would not "
                f"resume from it and total_limit would delete it first. Set "
                f"accelerator.project_configuration.iteration = {newest + 1} (load_state() does "
                "this itself), or pass an explicit output_dir")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    base = max((n for n, k in found.items() if k == "dckpt"), default=None)
    return target, (f"checkpoint_{base}" if base is not None else None), lock


def _apply_total_limit(root: Path, limit: int | None, new: int) -> None:
    """accelerate's total_limit, after the commit: the oldest checkpoint_<n> beyond the
    newest `limit` go (accelerate deletes before it writes; a crash then lost one)."""
    if limit is None:
        return
    found = sorted(int(m.group(1)) for p in root.iterdir()
                   if (m := _AUTO_NAME.match(p.name)) and p.is_dir())
    for n in found[:max(0, len(found) - max(limit, 1))]:
        if n == new:
            continue
        # Renamed first: a crash mid-delete leaves a hidden staging name, not a half-deleted
        # checkpoint_<n> that load_state() could pick; the next save clears it.
        trash = root / f".checkpoint_{n}{TMP_MARK}deleting"
        os.rename(root / f"checkpoint_{n}", trash)
        shutil.rmtree(trash, ignore_errors=True)


@dist.collective
def save_state(accelerator: Accelerator, output_dir: str | os.PathLike | None = None,
               safe_serialization: bool = True, **save_model_func_kwargs) -> Path:
    """accelerate's Accelerator.save_state, written by dckpt. Returns the checkpoint path.

    safe_serialization is accepted for compatibility: dckpt never pickles."""
    if accelerator.distributed_type in _OWN_ENGINES:
        return Accelerator.save_state(accelerator, output_dir, safe_serialization,
                                      **save_model_func_kwargs)
    pc = accelerator.project_configuration
    lock = base = None
    if pc.automatic_checkpoint_naming:
        target, base, lock = _begin_automatic(accelerator)
    elif output_dir is None:
        raise ValueError("save_state needs an output_dir unless the Accelerator has "
                         "ProjectConfiguration(automatic_checkpoint_naming=True)")
    else:
        target = Path(os.path.expanduser(output_dir))
    try:
        # Unwrapped once per save (accelerate's unwrap_model checks for every engine).
        bare = [_model_for_state(accelerator, m) for m in accelerator._models]
        weights = [m.state_dict() for m in bare]
        if accelerator._save_model_state_pre_hook:
            if accelerator.is_main_process:
                target.mkdir(parents=True, exist_ok=True)
            accelerator.wait_for_everyone()
            for hook in accelerator._save_model_state_pre_hook.values():
                hook(accelerator._models, weights, str(target))
            accelerator.wait_for_everyone()
        state = components(accelerator, bare[:len(weights)], weights, unwrapped=True)
        counters = {"step": training_step(accelerator), "iteration": int(pc.iteration),
                    "accelerate_step": int(accelerator.step)}
        log.info("dckpt: saving accelerator state to %s", target)
        with _keeping_extras(target):
            opts = options(accelerator)
            checkpoint.save(state, target, overwrite=True, counters=counters,
                            rank_state={"rng": rng.capture(own_device_only=dist.active())},
                            base=target.parent / base if base else None,
                            **{k: v for k, v in opts.items() if k != "verify"})
        if lock is not None:
            try:
                _apply_total_limit(target.parent, pc.total_limit, int(pc.iteration))
            except OSError as e:
                # The new checkpoint is committed and the others wait at the barrier below:
                # housekeeping that failed on rank 0 must not fail the save there alone.
                log.warning("dckpt: %s is committed, but total_limit could not remove older "
                            "checkpoints: %s", target, e)
    finally:
        if lock is not None:
            lock.release()
    if pc.automatic_checkpoint_naming:
        dist.barrier(None, "save_state")  # every process sees the folder as it now is
    pc.iteration += 1
    return target


class _keeping_extras:
    """Files other than dckpt's own in the target directory (what save pre-hooks write, or
    whatever the user keeps there: accelerate only adds files to a directory) survive the
    atomic replacement of the directory: rank 0 parks them beside it during the save and
    moves them into the committed checkpoint after."""

    def __init__(self, target: Path):
        self.target, self.parked = target, None

    def __enter__(self):
        if dist.rank() == 0 and self.target.is_dir():
            extras = [p for p in self.target.iterdir() if not _is_dckpt_file(p.name)]
            if extras:
                self.parked = staging_dir(self.target)
                self.parked.mkdir()
                for p in extras:
                    os.rename(p, self.parked / p.name)
            if not any(self.target.iterdir()):
                self.target.rmdir()  # e.g. made for the hooks: the save creates it afresh
        return self

    def __exit__(self, *exc) -> None:
        # After a failed save too: they go back where they were.
        if self.parked is not None:
            self.target.mkdir(parents=True, exist_ok=True)
            for p in self.parked.iterdir():
                if not (self.target / p.name).exists():
                    os.rename(p, self.target / p.name)
            shutil.rmtree(self.parked, ignore_errors=True)
            commit.fsync_dir(self.target)


def _is_dckpt_file(name: str) -> bool:
    return name == MANIFEST_NAME or (name.startswith("rank-") and name.endswith(".dckpt"))


# ---- load ----------------------------------------------------------------------------------
@dist.collective
def load_state(accelerator: Accelerator, input_dir: str | os.PathLike | None = None,
               load_kwargs: dict | None = None, *, allow_pickle: bool = False,
               **load_model_func_kwargs) -> ResumeReport:
    """accelerate's Accelerator.load_state, read by dckpt (verified). Returns what was restored.

    A folder written by accelerate's own save_state is read as well; its pickled files are
    opened with torch.load(weights_only=True), and where a file needs real unpickling (it can
    run code) only with allow_pickle=True. map_location is checked as accelerate checks it
    and otherwise ignored: dckpt reads straight into the live tensors, wherever they are.

    With automatic checkpoint naming, project_configuration.iteration is then moved past the
    newest checkpoint_<n>, so the next save_state() is the newest: accelerate would name it
    from the iteration the process started with, and total_limit would delete it first."""
    if accelerator.distributed_type in _OWN_ENGINES:
        return Accelerator.load_state(accelerator, input_dir, load_kwargs,
                                      **load_model_func_kwargs)
    t0 = time.perf_counter()
    if load_model_func_kwargs.pop("map_location", None) not in _MAP_LOCATIONS:
        raise TypeError("Unsupported optimizer map location passed, please choose one of `None`,"
                        " `'cpu'`, or `'on_device'`")  # accelerate's words
    pc = accelerator.project_configuration
    found = _numbered(Path(accelerator.project_dir) / CHECKPOINTS) \
        if pc.automatic_checkpoint_naming else {}
    path = _input_path(accelerator, input_dir, found)
    log.info("dckpt: loading accelerator state from %s", path)
    models = list(accelerator._models)
    for hook in accelerator._load_model_state_pre_hook.values():
        hook(models, str(path))
    if (path / MANIFEST_NAME).is_file():
        report = _load_dckpt(accelerator, path, models, load_model_func_kwargs)
    elif accelerate_folder.looks_like(path):
        report = accelerate_folder.load(accelerator, path, models, allow_pickle=allow_pickle,
                                        **load_model_func_kwargs)
        report.step = training_step(accelerator)
    else:
        raise CheckpointNotFoundError(f"{path} is neither a dckpt checkpoint (no {MANIFEST_NAME})"
                                      " nor a folder written by accelerate's save_state")
    if found and pc.iteration <= max(found):
        log.info("dckpt: project_configuration.iteration %d -> %d (after checkpoint_%d)",
                 pc.iteration, max(found) + 1, max(found))
        pc.iteration = max(found) + 1
    report.seconds = time.perf_counter() - t0
    return report


def _load_dckpt(accelerator: Accelerator, path: Path, models: list,
                load_model_func_kwargs: dict) -> ResumeReport:
    r = dist.rank()
    m = checkpoint.read_manifest(path, rank=r)  # the index and this rank's records
    own = m.ranks[r] if r < m.world_size else None
    saved = treecodec.decode((own or m.ranks[0])["tree"])
    _check_custom_count(path, saved, len(accelerator._custom_objects))
    state = components(accelerator, models, load_kwargs=load_model_func_kwargs)
    # accelerate restores no data position (nor fails without one), and a checkpoint made by
    # `dckpt convert` from accelerate's folder has none: such loaders start their epoch anew.
    lenient = [k for k in state if k not in saved and (k == "accelerator" or
                                                       k.startswith("dataloader"))]
    for k in lenient:
        log.warning("dckpt: %s has no %s; %s", path, k, "it starts its epoch from the beginning"
                    if k != "accelerator" else "accelerator.step taken from its counters")
    # The manager's resume (load_step, resumed): RNG streams checked before any read and set
    # after; collective, as the manager's restore: one process failing fails them all.
    attempt = load_step(state, path, rank=r, allow_missing=lenient, rng_hint="",
                        verify=options(accelerator).get("verify", True),
                        threads=options(accelerator).get("threads", 0), manifest=m)
    dist.raise_if_any_failed(attempt.failure, None, f"load_state of {path}")
    if "accelerator" in lenient and isinstance(m.counters.get("accelerate_step"), int):
        accelerator.step = m.counters["accelerate_step"]
    c = m.counters
    step = c.get("step", c.get("iteration", 0))  # checkpoints of older versions: the iteration
    return resumed(attempt, int(step), rank=r)


def _input_path(accelerator: Accelerator, input_dir, found: dict[int, str]) -> Path:
    if input_dir is not None:
        input_dir = os.path.expanduser(input_dir)
        if not os.path.isdir(input_dir):
            raise ValueError(f"Tried to find {input_dir} but folder does not exist")
        return Path(input_dir)
    if not accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError("No input_dir provided and automatic checkpoint naming is disabled.")
    root = Path(accelerator.project_dir) / CHECKPOINTS
    usable = [n for n, kind in found.items() if kind != "other"]
    for n in sorted(n for n in found if n > max(usable, default=-1)):
        log.warning("dckpt: %s/checkpoint_%d is neither a dckpt checkpoint nor accelerate's "
                    "folder; loading an older one", root, n)
    if not usable:
        raise CheckpointNotFoundError(f"no checkpoint_<n> to load under {root}")
    return root / f"checkpoint_{max(usable)}"


def _check_custom_count(path: Path, saved, registered: int) -> None:
    found = sum(1 for k in saved if isinstance(k, str) and k.startswith("custom_")) \
        if isinstance(saved, dict) else 0
    if found != registered:
        raise RuntimeError(
            f"Number of custom checkpoints in folder {path} does not match the number of "
            f"registered objects:\n\tFound checkpoints: {found}\n\tRegistered objects: "
            f"{registered}\nPlease make sure to only load checkpoints from folders that were "
            "created with the same set of registered objects.")


# ---- the drop-in ---------------------------------------------------------------------------
def _prepare_data_loader(self, data_loader, device_placement=None, slice_fn_for_dispatch=None):
    prepared = Accelerator.prepare_data_loader(self, data_loader, device_placement,
                                               slice_fn_for_dispatch)
    return track_position(prepared) if hasattr(prepared, "base_dataloader") else prepared


def _skip_first_batches(self, dataloader, num_batches: int = 0):
    # After load_state the loader itself resumes at the exact batch; scripts written for
    # accelerate also call skip_first_batches for that, which must not skip a second time.
    pending = getattr(dataloader, "dckpt_pending_batches", lambda: None)()
    if pending is not None:
        if pending != num_batches:
            log.warning("dckpt: skip_first_batches(%d) ignored: the loader resumes itself "
                        "after batch %d of the checkpoint's epoch", num_batches, pending)
        return dataloader
    return Accelerator.skip_first_batches(self, dataloader, num_batches)


class DckptAccelerator(Accelerator):
    """An Accelerator whose save_state()/load_state() write and read dckpt checkpoints.

    dckpt: options for dckpt (compression=None|"zstd"|level, threads, fsync, verify);
    save_on: a signal, signals or a dckpt.Preemption: save_state_if_preempted(step) at each
    step boundary then saves at a step all processes agree on and exits (docs/preemption.md)."""

    def __init__(self, *args, dckpt: dict | None = None, save_on=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._dckpt_options = dict(dckpt or {})
        self.preemption = None
        if save_on is not None:
            from ..manager.preemption import Preemption
            self.preemption = Preemption.of(save_on)
            self.preemption.install()

    def save_state_if_preempted(self, step: int, output_dir=None, **save_kwargs) -> bool:
        """At a step boundary, on every process: at the step agreed after a save_on signal,
        save_state(output_dir, ...) and exit with the Preemption's code; else False."""
        if self.preemption is None or not self.preemption.due(step):
            return False
        self.save_state(output_dir, **save_kwargs)
        log.warning("dckpt: preemption checkpoint of step %d committed", step)
        raise SystemExit(self.preemption.code)

    save_state = save_state
    load_state = load_state
    prepare_data_loader = _prepare_data_loader
    skip_first_batches = _skip_first_batches


def install(accelerator: Accelerator, **dckpt_options) -> Accelerator:
    """Make an existing Accelerator save and load with dckpt; returns it. Data loaders it has
    already prepared start tracking their position now (at their next epoch)."""
    accelerator._dckpt_options = dckpt_options
    for name, fn in (("save_state", save_state), ("load_state", load_state),
                     ("prepare_data_loader", _prepare_data_loader),
                     ("skip_first_batches", _skip_first_batches)):
        setattr(accelerator, name, MethodType(fn, accelerator))
    for loader in accelerator._dataloaders:
        track_position(loader)
    return accelerator


__all__ = ["DckptAccelerator", "install", "save_state", "load_state", "components",
           "training_step", "ModelWeights"]
