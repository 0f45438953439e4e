"""ROAM: multi-scale ROI transformer with class-specific gated-attention MIL for whole-slide images."""
