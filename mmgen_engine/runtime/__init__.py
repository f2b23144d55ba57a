"""Runtime: caches, sampler and the decode loop; models know nothing about scheduling."""
from .generate import generate
from .kv_cache import CrossKVCache, KVCache
from .sampler import Sampler, SamplingParams

__all__ = ["CrossKVCache", "generate", "KVCache", "Sampler", "SamplingParams"]
