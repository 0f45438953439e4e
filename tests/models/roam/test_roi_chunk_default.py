"""The default ROI chunk (64, the fastest measured) gives the same outputs as encoding all ROIs at once."""

from __future__ import annotations

import torch

from msfm.models.roam.model import DEFAULT_ROI_CHUNK
from msfm.registry import create_model


def test_default_roi_chunk_is_64_and_changes_nothing() -> None:
    assert DEFAULT_ROI_CHUNK == 64
    torch.manual_seed(0)
    model = create_model("roam-tiny", n_classes=3).eval()
    k = 2 * DEFAULT_ROI_CHUNK + 5  # three chunks, the last one partial
    x = torch.randn(1, k, 84, model.config.d_in)
    passes: list[int] = []
    hook = model.pyramid.register_forward_hook(lambda _m, inp, _out: passes.append(inp[0].shape[0]))
    with torch.inference_mode():
        default = model(x)
        hook.remove()
        whole = model(x, roi_chunk=k)
        small = model(x, roi_chunk=7)
    assert passes == [DEFAULT_ROI_CHUNK, DEFAULT_ROI_CHUNK, 5]
    for other in (whole, small):
        torch.testing.assert_close(default.logits, other.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(default.roi_embeddings, other.roi_embeddings, rtol=1e-5, atol=1e-6)
