"""Paged cached-attention backends behind one descriptor contract, registered by name."""

from .descriptor import METADATA_NAMES, AttentionConstants, AttentionDescriptor, CacheSpec, PrepareMetadata
from .registry import AttentionRegistry, resolve_attention_backend

__all__ = [
    "METADATA_NAMES",
    "AttentionConstants",
    "AttentionDescriptor",
    "AttentionRegistry",
    "CacheSpec",
    "PrepareMetadata",
    "resolve_attention_backend",
]
