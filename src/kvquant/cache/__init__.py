"""The compressed KV cache: packed per-layer storage and a transformers ``Cache`` that generates from it."""

from .attention import ATTENTION_NAME, kvquant_attention_forward
from .kvquant_cache import ContextLengthError, FP16SlidingLayer, KVQuantCache, KVQuantLayer, MemoryReport
from .storage import LayerStorage

__all__ = [
    "ATTENTION_NAME",
    "ContextLengthError",
    "KVQuantCache",
    "FP16SlidingLayer",
    "KVQuantLayer",
    "LayerStorage",
    "MemoryReport",
    "kvquant_attention_forward",
]
