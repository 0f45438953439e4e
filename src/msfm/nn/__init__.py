"""Layers shared by the model families: attention, transformer and Performer stacks, value embeddings.

Modules take and return tensors only (no files, no devices, no printing).
"""

from __future__ import annotations

from msfm.nn.attention import KVCache, MultiheadSelfAttention
from msfm.nn.performer import FastAttention, Performer, PerformerLayer, gaussian_orthogonal_random_matrix
from msfm.nn.state_dict import check_layout, rename_keys, strip_prefix
from msfm.nn.transformer import TransformerEncoder, TransformerEncoderLayer
from msfm.nn.value_embedding import AutoDiscretizationEmbedding

__all__ = [
    "AutoDiscretizationEmbedding",
    "FastAttention",
    "KVCache",
    "MultiheadSelfAttention",
    "Performer",
    "PerformerLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "check_layout",
    "gaussian_orthogonal_random_matrix",
    "rename_keys",
    "strip_prefix",
]
