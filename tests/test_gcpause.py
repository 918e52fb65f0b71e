"""dckpt.gcpause: the cyclic collector is paused for a main-thread save or load and only then."""
import gc
import threading

import torch

import dckpt
from dckpt import checkpoint, gcpause


def test_save_pauses_collector_and_restores_it(tmp_path, monkeypatch):
    seen = []
    real = checkpoint._build_manifest

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_build_manifest", spy)
    assert gc.isenabled()
    dckpt.save({"w": torch.ones(3)}, tmp_path / "a")
    assert seen == [False] and gc.isenabled()

    gc.disable()  # a caller that keeps it off gets it back off
    try:
        dckpt.save({"w": torch.ones(3)}, tmp_path / "b")
        assert not gc.isenabled()
    finally:
        gc.enable()

    t = threading.Thread(target=dckpt.save, args=({"w": torch.ones(3)}, tmp_path / "c"))
    t.start()
    t.join()
    assert seen == [False, False, True]  # a background save leaves the collector alone


def test_nested_pauses_and_errors_restore():
    @gcpause.during
    def inner():
        assert not gc.isenabled()
        raise ValueError("boom")

    @gcpause.during
    def outer():
        try:
            inner()
        except ValueError:
            pass
        assert not gc.isenabled()  # the outer pause still holds

    outer()
    assert gc.isenabled()


def test_load_pauses_collector_and_restores_it(tmp_path, monkeypatch):
    from dckpt.state import restore
    dckpt.save({"w": torch.ones(3)}, tmp_path / "a")
    seen = []
    real = restore.restore_into

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "restore_into", spy)
    live = {"w": torch.zeros(3)}
    dckpt.load(tmp_path / "a", into=live)
    assert seen == [False] and gc.isenabled() and torch.all(live["w"] == 1)
