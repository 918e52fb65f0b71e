"""dckpt.engine.gcpause: the cyclic collector is paused for a main-thread save or load and only then."""
import gc
import threading

import torch

import dckpt
import dckpt.verify
from dckpt.engine import checkpoint, gcpause


def collector_states(monkeypatch, module, name: str) -> list:
    """Wrap module.name so each call records whether the collector was enabled then."""
    seen, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_save_pauses_collector_and_restores_it(tmp_path, monkeypatch):
    seen = collector_states(monkeypatch, checkpoint, "_build_manifest")
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


def test_load_and_verify_pause_collector_and_restore_it(tmp_path, monkeypatch):
    from dckpt.tools.verify import integrity
    dckpt.save({"w": torch.ones(3)}, tmp_path / "a")
    loading = collector_states(monkeypatch, checkpoint, "restore_into")
    verifying = collector_states(monkeypatch, integrity, "check_structure")
    live = {"w": torch.zeros(3)}
    dckpt.load(tmp_path / "a", into=live)
    assert dckpt.verify.verify(tmp_path / "a").ok
    assert loading == [False] and verifying == [False] and gc.isenabled()
    assert torch.all(live["w"] == 1)
