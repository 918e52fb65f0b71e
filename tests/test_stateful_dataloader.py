"""torchdata's StatefulDataLoader in a dckpt state: saved and restored through its own
state_dict / load_state_dict, worker processes included (num_workers=2, random
augmentation drawn inside the workers), mid-epoch, through a CheckpointManager."""
import pytest
import torch

import dckpt

sdl = pytest.importorskip("torchdata.stateful_dataloader")


class Augmented(torch.utils.data.Dataset):
    """A sample plus noise drawn in the worker from a generator of the dataset, which
    StatefulDataLoader saves and restores in each worker through the dataset's own
    state_dict / load_state_dict."""

    def __init__(self):
        self.g = torch.Generator().manual_seed(0)

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.tensor([float(i)]) + torch.rand(1, generator=self.g)

    def state_dict(self):
        return {"g": self.g.get_state()}

    def load_state_dict(self, state):
        self.g.set_state(state["g"])


def seed_worker(worker_id):
    info = torch.utils.data.get_worker_info()
    info.dataset.g.manual_seed(100 + worker_id)


def loader():
    return sdl.StatefulDataLoader(Augmented(), batch_size=4, shuffle=True, num_workers=2,
                                  generator=torch.Generator().manual_seed(5),
                                  worker_init_fn=seed_worker)


def batches(dl, epochs):
    out = []
    for _ in range(epochs):
        out += [b.flatten().tolist() for b in dl]
    return out


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
def test_mid_epoch_resume_with_workers_is_exact(tmp_path):
    torch.manual_seed(0)
    reference = batches(loader(), 2)

    torch.manual_seed(0)
    dl = loader()
    it = iter(dl)
    got = [next(it).flatten().tolist() for _ in range(6)]  # epoch 0, 6 of 10 batches
    mgr = dckpt.CheckpointManager(tmp_path, fsync=False)
    mgr.save(6, {"data": dl})
    del it, dl

    torch.manual_seed(123)  # a fresh process would not have the same global stream
    fresh = loader()
    report = mgr.restore({"data": fresh})
    assert report.components == {"data": "data"}
    got += [b.flatten().tolist() for b in fresh]  # the rest of epoch 0
    got += batches(fresh, 1)
    assert got == reference, "the resumed loader's batches differ (order or worker RNG)"


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
def test_state_is_stored_as_its_own_state_dict(tmp_path):
    dl = loader()
    it = iter(dl)
    next(it)
    dckpt.save({"data": dl}, tmp_path / "c")
    stored = dckpt.load(tmp_path / "c")["data"]
    own = dl.state_dict()
    assert set(stored) == set(own)  # the loader's own keys
    workers = stored["_snapshot"]["_worker_snapshots"]
    assert len(workers) == 2  # one state per worker process, the dataset's among them
    assert all("dataset_state" in w for w in workers.values())
