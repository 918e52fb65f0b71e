"""Consistency of the recorded training state, from the manifest alone.

Metadata: step / epoch / step-in-epoch coherent, the data position agreeing with them.
Training state: optimizer step count against the global step (gradient accumulation and
skipped AMP steps allowed, within a tolerance that scales with the steps per epoch), the
scheduler's step against the optimizer's, the learning rate sane for the scheduler.
Completeness: per rank, the parts an exact resume needs.

Only 0-d optimizer `step` tensors are read (a few bytes each, hash-checked).
"""
from __future__ import annotations

import math
from pathlib import Path

from ...format import anatomy
from ...format.anatomy import Component, RankView, as_float, as_int
from ...format.layout import parse_step_dir
from ...format.manifest import Manifest
from .report import ERROR, PASS, WARNING, CheckpointReport, Location, RankCompleteness

# Gradient accumulation factors tried when the optimizer has stepped fewer times than the
# run counts; a recorded counters["grad_accum"] is used instead when present.
ACCUM_FACTORS = range(2, 129)


def tolerance(steps_per_epoch: int | None, step: int) -> int:
    """Steps of disagreement that are not suspicious: AMP skips optimizer steps while the
    loss scale settles, and a counter can be saved either side of its increment. Scales
    with the epoch length (a tenth of it), or with the run length when that is unknown."""
    if steps_per_epoch:
        return max(2, steps_per_epoch // 10)
    return max(2, step // 50)


def steps_per_epoch(c: dict) -> int | None:
    spe = as_int(c.get("steps_per_epoch"))
    if spe:
        return spe
    step, epoch, sie = as_int(c.get("step")), as_int(c.get("epoch")), as_int(c.get("step_in_epoch"))
    if step is not None and epoch and sie is not None and step >= sie:
        return (step - sie) // epoch or None
    return None


def check_metadata(ckpt: Path, m: Manifest, rep: CheckpointReport,
                   view: RankView | None) -> None:
    g = "metadata"
    c = m.counters
    dir_step = parse_step_dir(ckpt.name)
    step = as_int(c.get("step"))
    rep.step = step if step is not None else dir_step
    if not c:
        rep.add(g, "metadata.counters", WARNING, "no training counters recorded (saved with "
                "dckpt.save, not a CheckpointManager): the resume position is unknown")
        return
    if "step" in c and (step is None or step < 0):
        rep.add(g, "metadata.step", ERROR, f"step {c.get('step')!r} is not a non-negative integer")
        return
    if dir_step is not None and step is not None and dir_step != step:
        rep.add(g, "metadata.step", ERROR, f"the directory is step {dir_step} but the manifest "
                f"records step {step}: the checkpoint was renamed or its state is from "
                "another step")
    epoch, sie = c.get("epoch"), c.get("step_in_epoch")
    for name, v in (("epoch", epoch), ("step_in_epoch", sie)):
        if v is not None and (as_int(v) is None or as_int(v) < 0):
            rep.add(g, f"metadata.{name}", ERROR, f"{name} {v!r} is not a non-negative integer")
            return
    epoch, sie = as_int(epoch), as_int(sie)
    if step is not None and sie is not None and sie > step:
        rep.add(g, "metadata.step_in_epoch", ERROR, f"step_in_epoch {sie} exceeds the global "
                f"step {step}")
    spe = as_int(c.get("steps_per_epoch"))
    if spe and step is not None and epoch is not None and sie is not None:
        expected = epoch * spe + sie
        if abs(expected - step) > tolerance(spe, step):
            rep.add(g, "metadata.epoch", WARNING, f"epoch {epoch} x {spe} steps + {sie} = "
                    f"{expected}, but the global step is {step}")
    if step is None:
        rep.add(g, "metadata.step", WARNING, "no global step recorded: the resume position "
                "is unknown")
    rep.add(g, "metadata.position", PASS, _position_text(step, epoch, sie))
    if view is not None:
        _check_loader(view, epoch, sie, rep)
    _check_losses(c.get("loss_history"), rep)
    bad = [k for k, v in m.metrics.items()
           if as_float(v) is not None and not math.isfinite(float(v))]
    if bad:
        rep.add(g, "metadata.metrics", WARNING, f"non-finite metric(s): "
                + ", ".join(f"{k}={m.metrics[k]}" for k in bad))


def _position_text(step, epoch, sie) -> str:
    head = f"step {step}" if step is not None else "no global step"
    if epoch is None:
        return f"{head}; no epoch recorded"
    if sie is None:
        return f"{head}, epoch {epoch}; step in epoch not recorded"
    if sie == 0:
        return (f"{head}, epoch {epoch}, step 0 in epoch: end-of-epoch checkpoint "
                f"({epoch} epoch(s) complete; a resume starts epoch {epoch} at its first batch)")
    return (f"{head}, epoch {epoch}, step {sie} in epoch: mid-epoch checkpoint (a resume "
            f"continues epoch {epoch} after {sie} step(s))")


def _check_loader(view: RankView, epoch, sie, rep: CheckpointReport) -> None:
    for data in view.of_kind("data"):
        l_epoch, batches = anatomy.loader_position(data)
        if epoch is not None and l_epoch is not None and l_epoch != epoch:
            rep.add("metadata", "metadata.data_position", WARNING,
                    f"data component '{data.key}' is in epoch {l_epoch}, the counters say epoch "
                    f"{epoch}: the resumed run would see another epoch's batch order")
        elif sie is not None and batches is not None:
            if batches == sie or (sie and batches % sie == 0 and batches >= sie):
                how = "" if batches == sie else f" ({batches // sie} batches per step)"
                rep.add("metadata", "metadata.data_position", PASS,
                        f"data component '{data.key}' has consumed {batches} batch(es) of the "
                        f"epoch, matching step {sie} in epoch{how}")
            else:
                rep.add("metadata", "metadata.data_position", WARNING,
                        f"data component '{data.key}' has consumed {batches} batch(es) of the "
                        f"epoch but the counters record step {sie} in epoch")


def _check_losses(history, rep: CheckpointReport) -> None:
    if history is None:
        return
    if not isinstance(history, list) or any(as_float(v) is None for v in history):
        rep.add("metadata", "metadata.loss_history", WARNING,
                "loss_history is not a list of numbers")
        return
    if not history:
        return
    bad = [i for i, v in enumerate(history) if not math.isfinite(float(v))]
    if bad:
        rep.add("metadata", "metadata.loss_history", WARNING,
                f"{len(bad)} non-finite loss value(s) in the history (first at entry {bad[0]}, "
                f"last entry {history[-1]}): training had diverged")
    else:
        rep.add("metadata", "metadata.loss_history", PASS,
                f"loss history: {len(history)} finite value(s), last {float(history[-1]):.6g}")


# ---- training-state consistency -----------------------------------------------------------

def check_training(ckpt: Path, m: Manifest, rep: CheckpointReport, view: RankView,
                   damaged: set[str] = frozenset(), read_bytes=None) -> None:
    """`damaged`: tensors the integrity checks reported; their step counts are not read.
    read_bytes(name): a tensor's raw bytes, where they are not in local files."""
    g = "training"
    c = m.counters
    step = as_int(c.get("step"))
    opts, scheds = view.of_kind("optimizer"), view.of_kind("scheduler")
    with anatomy.ScalarReader(ckpt, m, view.aliases, read_bytes) as reader:
        def read(name: str) -> float | None:
            return None if view.aliases.get(name, name) in damaged else reader(name)

        opt_steps = _check_optimizers(opts, read, step, c, rep, view)
    for sched in scheds:
        _check_scheduler(sched, opts, opt_steps, step, as_int(c.get("epoch")), rep)
    if not scheds:
        for opt in opts:
            lrs, _, _ = anatomy.optimizer_lrs(opt)
            _check_lr_values(f"optimizer '{opt.key}'", lrs, rep)
    for scaler in view.of_kind("scaler"):
        scale = as_float(scaler.state.get("scale")) if isinstance(scaler.state, dict) else None
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            rep.add(g, "training.scaler", ERROR, f"grad scaler '{scaler.key}' has scale {scale}")


def _check_optimizers(opts, read, step: int | None, c: dict, rep: CheckpointReport,
                      view: RankView) -> int | None:
    """Each optimizer's step counts: readable, agreeing, consistent with the global step.
    Returns the largest step count found (None: no optimizer keeps one)."""
    g, opt_steps = "training", None
    for opt in opts:
        steps = anatomy.optimizer_steps(opt, read)
        for tensor, why in steps.unread[:3]:
            rep.add(g, "training.optimizer_steps", ERROR,
                    f"optimizer '{opt.key}': cannot read step count '{tensor}': {why}",
                    Location(tensor=view.aliases.get(tensor, tensor)))
        if steps.count is None:
            if not steps.unread and not steps.skipped:
                rep.add(g, "training.optimizer_steps", PASS,
                        f"optimizer '{opt.key}' ({opt.short_type or 'state dict'}) keeps no "
                        "step count (nothing to compare)")
            continue
        if len(set(steps.values)) > 1:
            rep.add(g, "training.optimizer_steps", WARNING,
                    f"optimizer '{opt.key}': parameters record different step counts "
                    f"({int(min(steps.values))}..{int(max(steps.values))}): some were frozen or "
                    "added during training")
        opt_steps = steps.count if opt_steps is None else max(opt_steps, steps.count)
        if step is not None:
            _compare_steps(opt.key, steps.count, step, c, rep)
    return opt_steps


def _compare_steps(key: str, opt_steps: int, step: int, c: dict, rep: CheckpointReport) -> None:
    g, id_ = "training", "training.optimizer_steps"
    spe = steps_per_epoch(c)
    tol = tolerance(spe, step)
    diff = step - opt_steps
    head = f"optimizer '{key}' has taken {opt_steps} step(s), the global step is {step}"
    if diff == 0:
        rep.add(g, id_, PASS, f"{head}: consistent")
        return
    if 0 < diff <= tol:
        rep.add(g, id_, PASS, f"{head}: within tolerance ({diff} <= {tol}; AMP skips steps "
                "while the loss scale settles)")
        return
    if diff < 0 and -diff <= 1:
        rep.add(g, id_, PASS, f"{head}: off by one (counter saved before its increment)")
        return
    accum = as_int(c.get("grad_accum")) or as_int(c.get("gradient_accumulation_steps"))
    factors = [accum] if accum else ACCUM_FACTORS
    if diff > 0 and opt_steps > 0:
        for k in factors:
            if abs(step - k * opt_steps) <= max(tol, k):
                rep.add(g, id_, PASS, f"{head}: consistent with gradient accumulation over {k} "
                        "micro-steps")
                return
    if diff < 0:
        rep.add(g, id_, WARNING, f"{head}: the optimizer has stepped {-diff} time(s) more than "
                "the run counts (tolerance "
                f"{tol}): its state is probably from a later point or another run")
    else:
        rep.add(g, id_, WARNING, f"{head}: {diff} step(s) behind, beyond the tolerance of {tol} "
                "and not explained by gradient accumulation: optimizer moments may not match "
                "the weights")


def _check_scheduler(sched: Component, opts: list[Component], opt_steps: int | None,
                     step: int | None, epoch: int | None, rep: CheckpointReport) -> None:
    g = "training"
    info = anatomy.scheduler_info(sched)
    name = f"scheduler '{sched.key}'" + (f" ({sched.short_type})" if sched.short_type else "")
    reference = opt_steps if opt_steps is not None else step
    if (info.step_count is not None and info.last_epoch is not None
            and info.step_count != info.last_epoch + 1
            and "Sequential" not in (sched.type_name or "")):
        # Every LRScheduler.step() moves both; only an edited or spliced state breaks this.
        rep.add(g, "training.scheduler_steps", WARNING,
                f"{name}: _step_count {info.step_count} does not follow last_epoch "
                f"{info.last_epoch} (expected {info.last_epoch + 1})")
    if info.last_epoch is not None and reference is not None:
        what = "optimizer steps" if opt_steps is not None else "global step"
        if info.last_epoch == reference:
            rep.add(g, "training.scheduler_steps", PASS,
                    f"{name} has stepped {info.last_epoch} time(s), matching the {what}")
        elif epoch is not None and info.last_epoch in (epoch, epoch - 1):
            rep.add(g, "training.scheduler_steps", PASS,
                    f"{name} has stepped {info.last_epoch} time(s), once per epoch")
        elif step is not None and info.last_epoch == step:
            rep.add(g, "training.scheduler_steps", PASS,
                    f"{name} has stepped {info.last_epoch} time(s), matching the global step")
        else:
            tol = tolerance(None, reference)
            level = PASS if abs(info.last_epoch - reference) <= tol else WARNING
            rep.add(g, "training.scheduler_steps", level,
                    f"{name} has stepped {info.last_epoch} time(s), the {what} "
                    f"{'are' if opt_steps is not None else 'is'} {reference}"
                    + ("" if level == PASS else ": the learning-rate schedule is out of step "
                       "with training"))
    lrs = info.last_lr
    opt_lrs, initial, peaks = ([], [], [])
    for opt in opts:
        a, b, p = anatomy.optimizer_lrs(opt)
        opt_lrs += a
        initial += b
        peaks += p
    if not lrs:
        lrs = opt_lrs
    if not _check_lr_values(name, lrs, rep):
        return
    if opt_lrs and len(opt_lrs) == len(lrs) and any(
            not math.isclose(a, b, rel_tol=1e-6, abs_tol=0) for a, b in zip(lrs, opt_lrs)):
        rep.add(g, "training.lr", WARNING, f"{name} last set lr {_lrs(lrs)} but the optimizer "
                f"holds {_lrs(opt_lrs)}: they were saved at different moments")
        return
    base = info.base_lrs or initial
    top = max([*base, *info.max_lrs, *peaks], default=None)
    lr = max(lrs)
    if top is None or top <= 0:
        rep.add(g, "training.lr", PASS, f"learning rate {_lrs(lrs)}")
    elif lr > top * (1 + 1e-6):
        rep.add(g, "training.lr", WARNING, f"{name}: learning rate {_lrs(lrs)} exceeds the "
                f"schedule's peak {top:.3g}")
    elif lr < top * 1e-4:
        rep.add(g, "training.lr", WARNING, f"{name}: learning rate {_lrs(lrs)} is below 1e-4 of "
                f"the base {top:.3g}: the schedule has decayed (nearly) to zero, further "
                "training changes little")
    else:
        rep.add(g, "training.lr", PASS, f"learning rate {_lrs(lrs)} within the schedule's range "
                f"(base {top:.3g})")


def _check_lr_values(name: str, lrs: list[float], rep: CheckpointReport) -> bool:
    bad = [v for v in lrs if not math.isfinite(v) or v < 0]
    if bad:
        rep.add("training", "training.lr", ERROR, f"{name}: learning rate {_lrs(bad)} is not a "
                "finite non-negative number")
        return False
    return bool(lrs)


def _lrs(values: list[float]) -> str:
    shown = sorted(set(values))
    return ", ".join(f"{v:.3g}" for v in shown[:4]) + (" ..." if len(shown) > 4 else "")


# ---- completeness -------------------------------------------------------------------------

_MISSING_WHY = {
    "model": "no model weights",
    "optimizer": "no optimizer state: moments restart from zero, loss spikes after resume",
    "scheduler": "no scheduler state: the learning-rate schedule restarts",
    "rng": "no RNG streams: dropout and shuffling differ after resume",
    "data": "no data-loader position: the resumed run sees another batch order",
}


def check_completeness(m: Manifest, views: list[RankView], rep: CheckpointReport) -> None:
    g = "completeness"
    seeded = m.meta.get(anatomy.RNG_SEEDED_NOW)
    groups: dict[tuple, list[int]] = {}
    for v in views:
        rep.ranks.append(RankCompleteness(v.rank, {c.key: c.kind for c in v.components},
                                          v.rng_streams, v.missing()))
        sig = (tuple(f"{c.key}:{c.kind}" for c in v.components), tuple(v.rng_streams),
               tuple(v.missing()))
        groups.setdefault(sig, []).append(v.rank)
    for ranks in groups.values():
        v = views[ranks[0]]
        who = _ranks_text(ranks)
        missing = v.missing()
        have = ", ".join(_part_text(v, p) for p in anatomy.TRAINING_PARTS if p not in missing)
        if not missing:
            rep.add(g, "completeness.parts", PASS, f"{who}: {have}", Location(rank=ranks[0]))
        for part in missing:
            level = ERROR if part == "model" else WARNING
            rep.add(g, f"completeness.{part}", level, f"{who}: {_MISSING_WHY[part]}",
                    Location(rank=ranks[0]))
        if missing and have:
            rep.add(g, "completeness.parts", PASS, f"{who}: present: {have}",
                    Location(rank=ranks[0]))
        absent = [s for s in anatomy.BASE_STREAMS if v.rng_streams and s not in v.rng_streams]
        if absent:
            rep.add(g, "completeness.rng", WARNING, f"{who}: RNG stream(s) {', '.join(absent)} "
                    "missing", Location(rank=ranks[0]))
    if seeded:
        by = seeded.get("by", "a repair") if isinstance(seeded, dict) else "a repair"
        rep.add(g, "completeness.rng_seeded_now", WARNING,
                f"RNG streams were added by {by} after the fact (seeded when repaired, not the "
                "run's own streams): training continues from here reproducibly, but not as the "
                "original run would have")


def _part_text(v: RankView, part: str) -> str:
    if part == "rng":
        return f"rng ({', '.join(v.rng_streams)})"
    comps = v.of_kind(part)
    names = [c.short_type or c.key for c in comps]
    return f"{part} ({', '.join(names)})" if names else part


def _ranks_text(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))
