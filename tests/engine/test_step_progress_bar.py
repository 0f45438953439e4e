"""The training bar's label: "step 120/900" when only max_steps bounds training, never "Epoch 0/-2"."""

from __future__ import annotations

from types import SimpleNamespace

from msfm.engine.trainer import _progress_bar


def _label(max_epochs: int | None, max_steps: int, step: int = 120) -> str:
    bar = _progress_bar(True)
    bar._trainer = SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps, global_step=step)
    return bar._get_train_description(0)


def test_steps_only_training_is_labelled_with_steps():
    assert _label(-1, 900) == "step 120/900"
    assert _label(None, 900) == "step 120/900"
    assert "-2" not in _label(-1, 900)


def test_epoch_bounded_training_keeps_the_epoch_label():
    assert _label(3, -1).startswith("Epoch 0/2")
