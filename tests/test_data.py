"""Data position: shuffled loaders resume at the exact next batch; seeded splits."""
import torch

import dckpt
from dckpt.state.data import ResumableLoader, deterministic_split


def batches(loader, n=None):
    out = []
    for b in loader:
        out.append(b.tolist())
        if n is not None and len(out) == n:
            break
    return out


def test_resume_mid_epoch_without_replay(tmp_path):
    data = list(range(30))
    torch.manual_seed(0)
    ref = ResumableLoader(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True))
    whole = batches(ref) + batches(ref)  # two epochs

    torch.manual_seed(0)
    loader = ResumableLoader(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True))
    first = batches(loader, 3)
    mgr = dckpt.CheckpointManager(tmp_path)
    mgr.save(3, {"data": loader})
    torch.manual_seed(12345)  # a new process would start from another state
    fetched = []

    class Spy(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            fetched.append(i)
            return data[i]
    resumed = ResumableLoader(torch.utils.data.DataLoader(Spy(), batch_size=4, shuffle=True))
    mgr.restore({"data": resumed})
    rest = batches(resumed) + batches(resumed)
    assert first + rest == whole
    assert len(fetched) == len(data) - 12 + len(data)  # consumed samples were not loaded again
    assert resumed.epoch == 2


def test_private_generator(tmp_path):
    data = list(range(20))
    ref = ResumableLoader(torch.utils.data.DataLoader(
        data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(7)))
    whole = batches(ref)
    loader = ResumableLoader(torch.utils.data.DataLoader(
        data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(7)))
    first = batches(loader, 2)
    dckpt.save({"data": loader}, tmp_path / "c")
    resumed = ResumableLoader(torch.utils.data.DataLoader(
        data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(99)))
    dckpt.load(tmp_path / "c", into={"data": resumed})
    assert first + batches(resumed) == whole


def test_deterministic_split():
    a = deterministic_split(100, (0.8, 0.2), seed=3)
    import random
    random.seed(0)
    b = deterministic_split(list(range(100)), (0.8, 0.2), seed=3)
    assert a == b and len(a[0]) == 80 and sorted(a[0] + a[1]) == list(range(100))
    assert deterministic_split(100, (0.8, 0.2), seed=4) != a
