"""Triton kernels, installed as ``mmgen_engine.kernels``.

Each kernel file reads as a short document: what it computes and the bytes it moves, the
``@triton.jit`` kernel, and a launcher that checks strides and picks block sizes. The registry in
``mmgen_engine.ops`` selects them per (op, device, dtype); the plain-torch reference is the spec.
"""
