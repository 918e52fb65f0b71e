"""Loaded into every interpreter of the accelerate specification run (test_accelerate_spec.py)
through a sitecustomize: `accelerate.Accelerator` becomes DckptAccelerator, and accelerate's own
checkpoint writers and readers raise, so a test that passes proves that dckpt did the work.
Also given to pytest (-p) to check that each collected test module got DckptAccelerator."""
import accelerate
import accelerate.accelerator
import accelerate.checkpointing

from dckpt.integrations.accelerate import DckptAccelerator

REFUSED = ("save_accelerator_state", "load_accelerator_state", "save_custom_state",
           "load_custom_state")


class AccelerateCheckpointingCalled(AssertionError):
    pass


def _refuse(name: str):
    def refuse(*args, **kwargs):
        raise AccelerateCheckpointingCalled(f"accelerate's own {name} was called: "
                                            "DckptAccelerator must save and load by itself")
    return refuse


for _name in REFUSED:
    # accelerator.py binds these names at import: both places.
    setattr(accelerate.checkpointing, _name, _refuse(_name))
    setattr(accelerate.accelerator, _name, _refuse(_name))
accelerate.Accelerator = DckptAccelerator


def pytest_collection_modifyitems(items):
    for item in items:
        got = getattr(item.module, "Accelerator", None)
        assert got is DckptAccelerator, f"{item.nodeid} runs {got}, not DckptAccelerator"
