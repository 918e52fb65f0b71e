"""Optimizers whose state is spread over ranks: ZeroRedundancyOptimizer and FSDP2's.

ZeroRedundancyOptimizer keeps each parameter's state on one rank only, and its own
state_dict() needs a gather onto one rank first. dckpt instead saves it through `ZeroState`:
each rank's part holds the state of the parameters it owns, keyed by *global* parameter index,
so the tensors are "owned" (written once, by their owner, under one global name). On load the
parts of all ranks are merged and each rank keeps the indices its live optimizer owns: the
same world size, another world size, or a plain optimizer (the whole state: consolidation).

An optimizer over FSDP2 (DTensor) parameters has no state before its first step; reading a
sharded checkpoint into it needs state tensors of the right layout, so `init_state` creates
them with one zero-gradient step at learning rate 0, as torch.distributed.checkpoint does.
"""
from __future__ import annotations

from typing import Any

import torch

from ..format.tree import ObjectState
from .sharding import is_dtensor
from ..state.flatten import type_name


def _is_zero(obj: Any) -> bool:
    return type(obj).__name__ == "ZeroRedundancyOptimizer" and hasattr(obj, "optim")


class ZeroState:
    """A ZeroRedundancyOptimizer seen as a partitioned state (see the module docstring)."""

    __module__ = "dckpt.partitioned"  # the type name checkpoints record: stable across moves

    def __init__(self, zero):
        self.zero = zero

    def owned_indices(self) -> set[int]:
        z = self.zero
        return {z._param_to_index[p] for group in z._partition_parameters()[z.rank]
                for p in group["params"]}

    def state_dict(self) -> dict:
        z = self.zero
        local = z.optim.state_dict()
        state = {}
        for lgroup, ggroup in zip(local["param_groups"], z._partition_parameters()[z.rank]):
            for li, p in zip(lgroup["params"], ggroup["params"]):
                if li in local["state"]:
                    state[z._param_to_index[p]] = local["state"][li]
        groups = torch.optim.Optimizer.state_dict(z)["param_groups"]  # global indices
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        self.zero.load_state_dict(state)  # takes global indices, keeps its own partition


ZERO_TYPE = type_name(ZeroState(None))


# Values that are neither an optimizer nor hold one: passed over at once (a state dict
# holds hundreds of tensors, each otherwise asked three questions per save).
_LEAVES = frozenset({torch.Tensor, torch.nn.Parameter, int, float, str, bool, type(None)})


def adapt(state: Any) -> Any:
    """`state` with every ZeroRedundancyOptimizer (in dicts, lists, tuples) wrapped in
    ZeroState; containers are copied only where something was wrapped."""
    if _is_zero(state):
        return ZeroState(state)
    if isinstance(state, dict):
        out = {k: v if type(v) in _LEAVES else adapt(v) for k, v in state.items()}
        return state if all(out[k] is state[k] for k in state) else out
    if isinstance(state, (list, tuple)):
        out = [v if type(v) in _LEAVES else adapt(v) for v in state]
        if all(a is b for a, b in zip(out, state)):
            return state
        return type(state)(out) if isinstance(state, tuple) else out
    return state


def merge_parts(tree: Any, others: list[Any], live: Any) -> Any:
    """`tree` with each ZeroState part replaced by the union of all ranks' parts (`others`
    are every rank's trees), restricted to the indices the live ZeroState owns."""
    if isinstance(tree, ObjectState) and tree.type_name == ZERO_TYPE:
        state = {}
        for other in others:
            if isinstance(other, ObjectState) and isinstance(other.state, dict):
                state.update(other.state.get("state", {}))
        if isinstance(live, ZeroState):
            keep = live.owned_indices()
            state = {i: v for i, v in state.items() if i in keep}
        return ObjectState(tree.type_name, {**tree.state, "state": dict(sorted(state.items()))})
    if isinstance(tree, dict):
        return {k: merge_parts(v, [o.get(k) if isinstance(o, dict) else None for o in others],
                               live.get(k) if isinstance(live, dict) else None)
                for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        same = isinstance(live, (list, tuple)) and len(live) == len(tree)
        out = [merge_parts(v, [o[i] if isinstance(o, (list, tuple)) and i < len(o) else None
                               for o in others], live[i] if same else None)
               for i, v in enumerate(tree)]
        return tuple(out) if isinstance(tree, tuple) else out
    return tree


def has_parts(tree: Any) -> bool:
    if isinstance(tree, ObjectState):
        return tree.type_name == ZERO_TYPE or has_parts(tree.state)
    if isinstance(tree, dict):
        return any(has_parts(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(has_parts(v) for v in tree)
    return False


def init_state(opt: torch.optim.Optimizer) -> bool:
    """Create the per-parameter state of an optimizer over DTensor parameters that has none
    yet, so a checkpoint can be read straight into its shards. Parameters are unchanged
    (learning rate 0, zero gradients). Returns whether it did anything."""
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if opt.state or not any(is_dtensor(p) for p in params):
        return False
    lrs = [g["lr"] for g in opt.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in opt.param_groups:
            g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        opt.step()
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        for p in params:
            p.grad = None
    return True


def init_states(state: Any) -> None:
    """init_state for every optimizer in `state` (dicts, lists, tuples)."""
    if isinstance(state, torch.optim.Optimizer) and not _is_zero(state):
        init_state(state)
    elif isinstance(state, dict):
        for v in state.values():
            init_states(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            init_states(v)


def write_back(orig: dict, adapted: dict) -> None:
    """Restore updated `adapted` (from adapt()); carry its new values back into `orig`,
    keeping the user's own objects where adapt() had put a ZeroState."""
    for k, v in adapted.items():
        if isinstance(v, ZeroState):
            continue
        if isinstance(v, dict) and isinstance(orig.get(k), dict) and v is not orig[k]:
            write_back(orig[k], v)
        elif isinstance(v, list) and any(isinstance(a, ZeroState) for a in v) and \
                isinstance(orig.get(k), list) and len(orig[k]) == len(v):
            orig[k][:] = [o if isinstance(a, ZeroState) else a for a, o in zip(v, orig[k])]
        else:
            orig[k] = v
