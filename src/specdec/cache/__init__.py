"""Preallocated KV cache with position-based writes, rollback and tree compaction."""

from specdec.cache.kv_cache import KVCache

__all__ = ["KVCache"]
