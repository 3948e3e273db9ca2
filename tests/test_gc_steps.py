"""StepAlignedGC: collections happen at the chosen steps only, and the automatic GC comes back."""

from __future__ import annotations

import gc

import pytest

from trainer.gc_steps import StepAlignedGC


@pytest.fixture
def collections():
    """The generations of the collections that run while the test does (gc.callbacks)."""
    seen: list[int] = []

    def on_gc(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(on_gc)
    yield seen
    gc.callbacks.remove(on_gc)
    gc.enable()
    gc.unfreeze()


def test_collects_only_every_interval_steps_then_restores(collections):
    sgc = StepAlignedGC(interval=3)
    assert not gc.isenabled() and gc.get_freeze_count() > 0
    collections.clear()
    for step in range(1, 8):
        # Garbage that would make the automatic collector run several times.
        for _ in range(5000):
            a = []
            a.append(a)
        sgc.step(step)
        assert len(collections) == step // 3, (step, collections)
    assert collections == [1, 1]  # young generations only, at steps 3 and 6
    sgc.epoch_end()
    assert collections[-1] == 2  # a full collection at the epoch's end
    sgc.close()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_interval_zero_leaves_python_gc_alone(collections):
    sgc = StepAlignedGC(interval=0)
    assert gc.isenabled()
    collections.clear()
    sgc.step(50)
    sgc.epoch_end()
    assert collections == []  # neither call collects (they allocate nothing, so no automatic run either)
    sgc.close()
    assert gc.isenabled()
    with pytest.raises(ValueError, match="interval"):
        StepAlignedGC(interval=-1)
