"""Background writes of async saves: O_DIRECT from the staging arena, paced by a duty cycle.

The staging layout puts each large tensor at the offset, modulo the O_DIRECT block, that
its bytes get in the data file, so the direct write sends them straight from the arena;
the checkpoint holds the same bytes as any other save."""
import pytest
import torch

import dckpt
from dckpt.engine import checkpoint
from dckpt.manager.async_save import AsyncOptions, storage_order
from dckpt.state.staging import CONGRUENT_MIN, DIRECT_ALIGN, layout

from test_async_save import live, mutate_everything, stored


def build():
    """Linear layers whose weights and moments are large leaves, with AdamW's 4-byte step
    counters and odd-sized biases between them in the file."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 1031), torch.nn.Linear(1031, 77),
                                torch.nn.Linear(77, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt}
    loss = model(torch.randn(8, 16)).square().mean()
    loss.backward()
    opt.step()
    return state


def step(state):
    model, opt = state["model"], state["optimizer"]
    opt.zero_grad()
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("mode", ["immediate", "deferred"])
def test_background_write_stores_the_snapshot(tmp_path, mode, direct):
    state = build()
    mgr = dckpt.CheckpointManager(tmp_path, async_save=AsyncOptions(
        snapshot=mode, direct=direct, duty=0.5))
    for n in (1, 2):  # the second save is incremental: unchanged chunks are skipped
        before = live(state)
        h = mgr.save(n, state)
        step(state)
        mutate_everything(state)
        h.result()
        assert stored(mgr.path(n)) == before
    mgr.close()
    fresh = build()
    dckpt.CheckpointManager(tmp_path).restore(fresh)
    assert live(fresh) == before


def test_large_leaves_are_staged_where_the_file_puts_them(tmp_path):
    state = build()
    leaves = checkpoint.snapshot(state).leaves
    offsets, _ = layout(leaves, storage_order(leaves))
    mgr = dckpt.CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, state).result()
    m = checkpoint.read_manifest(mgr.path(1))
    mgr.close()
    large = [(leaf, at) for leaf, at in zip(leaves, offsets) if leaf.nbytes >= CONGRUENT_MIN]
    assert len(large) >= 4  # weights and their moments
    odd = [leaf for leaf in leaves if leaf.nbytes % DIRECT_ALIGN]
    assert odd, "the state must put unaligned leaves between the large ones"
    for leaf, at in large:
        first = m.tensors[leaf.name].shards[0].chunks[0]
        assert at % DIRECT_ALIGN == first.offset % DIRECT_ALIGN, leaf.name
        assert at % leaf.value.element_size() == 0


def test_duty_is_validated():
    for duty in (0, -1, 1.01):
        with pytest.raises(ValueError, match="duty"):
            AsyncOptions(duty=duty)
