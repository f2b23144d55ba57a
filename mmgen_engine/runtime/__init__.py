"""Runtime: caches, sampler and the decode loop; models know nothing about scheduling."""
from .decoder import Decoder
from .generate import DecodeState, decode_step, generate, generate_stream
from .graphs import CUDAGraphs, GraphedCall
from .kv_cache import CrossKVCache, KVCache
from .recorded import RecordedSteps
from .sampler import Sampler, SamplingParams

__all__ = [
    "CrossKVCache",
    "CUDAGraphs",
    "Decoder",
    "DecodeState",
    "GraphedCall",
    "decode_step",
    "generate",
    "generate_stream",
    "KVCache",
    "RecordedSteps",
    "Sampler",
    "SamplingParams",
]
