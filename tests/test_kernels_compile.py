"""Every Triton kernel compiles for the GPUs the engine targets (sm_80, sm_90), without a GPU.

Triton's interpreter, which runs the kernel tests on CPU, is more forgiving than its compiler (types,
layouts, unsupported ops). So this test records every kernel launch the CPU tests' launchers make
in the interpreter (argument types and constexpr values), then compiles each distinct variant to
machine code with Triton's compiler in a subprocess (ptxas ships with Triton), for each target.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it where there is no GPU
    pytest.skip("records launches in Triton's interpreter; a GPU machine compiles by running the kernels",
                allow_module_level=True)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from mmgen_engine import ops  # noqa: E402
from mmgen_engine.kernels import (  # noqa: E402
    activation,
    conv,
    decode_attention,
    embedding,
    flash_attention,
    linear,
    norm,
    rotary,
    sampling,
)

TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
         torch.int32: "*i32", torch.bool: "*i1"}
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")

COMPILE = r'''
import json, sys, importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
failures = []
for v in json.loads(sys.stdin.read()):
    module, name = v["kernel"].rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    sig, consts = {}, {}
    for p in fn.params:
        kind, value = v["args"][p.name]
        if p.is_constexpr or kind is None:  # a None argument is specialized as a constexpr, as at launch
            sig[p.name], consts[p.name] = "constexpr", value
        else:
            sig[p.name] = kind
    for arch in (80, 90):
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                           options=v["options"])
        except Exception as e:
            failures.append(f"{v['kernel']} sm_{arch} {consts}: {type(e).__name__}: {str(e)[:300]}")
print(json.dumps(failures))
'''


def record_launches(monkeypatch) -> list[dict]:
    variants = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        values = dict(zip(self.arg_names, args))
        values.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        types = {}  # name -> (the type of a runtime argument, the value of a constexpr)
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                types[k] = (TYPES[v.dtype], None)
            elif isinstance(v, int) and not isinstance(v, bool):
                types[k] = ("i32" if -2**31 <= v < 2**31 else "i64", v)
            elif isinstance(v, float):
                types[k] = ("fp32", v)
            else:
                types[k] = (None, v)
        options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
        name = f"{self.fn.__module__}.{self.fn.__name__}"
        variants[json.dumps([name, types, options], sort_keys=True, default=str)] = {
            "kernel": name, "args": types, "options": options}
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return variants


def exercise_conv(dtype, g, cin=5, every_variant=True):
    """The fused conv with every stage (and, with ``every_variant``, the bare and 1x1 + ReLU convs
    and group_norm with each activation) at a tiny shape."""
    x = torch.randn(2, cin, 3, 4, generator=g).to(dtype)
    w = torch.randn(6, cin, 3, 3, generator=g).to(dtype)
    gn = (torch.randn(cin, generator=g), torch.randn(cin, generator=g), 1, 1e-5)
    conv.conv2d(x, w, w[:, 0, 0, 0], 1, True, gn, "silu", torch.randn(2, 6, 6, 8, generator=g).to(dtype), 0.5)
    if every_variant:
        conv.conv2d(x, w[:, :, :1, :1], None, 0, False, None, "relu", None, 1.0)
        conv.conv2d(x, w, None, 1, False, None, None, None, 1.0)
        for act in (None, "relu", "silu"):
            conv.group_norm(x, *gn, act)


def exercise_every_launcher():
    """Each launcher at small shapes in fp32 and fp16, every constexpr branch the engine uses."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        exercise_conv(dtype, g)
        x = torch.randn(3, 40, generator=g).to(dtype)
        w, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
        norm.layer_norm(x, w, b, 1e-5)
        norm.add_layer_norm(x, x, w, b, 1e-5)
        for approximate in ("none", "tanh", "sigmoid"):
            activation.bias_gelu(x, x[0], approximate)
        activation.bias_relu(x, x[0])
        tokens = torch.tensor([[1, 2]])
        embedding.embedding(tokens, tokens, x, x)
        embedding.embedding(tokens, tokens, x, x, w, b, 1e-5)
        q = torch.randn(2, 3, 16, generator=g).to(dtype)
        k = torch.randn(2, 3, 150, 16, generator=g).to(dtype)
        lengths = torch.tensor([5, 150])
        decode_attention.decode_attention(q, k, k.clone(), lengths, 0.25)  # split + combine
        decode_attention.decode_attention(q, k[:, :, :40], k[:, :, :40].clone(), torch.tensor([3, 40]), 0.25,
                                          q, q)  # one chunk, fused cache write
        beams = torch.randn(2 * 3, 3, 16, generator=g).to(dtype)
        decode_attention.decode_attention(beams, k, k.clone(), lengths, 0.25, group=3)  # 3 query rows per cache row
        # LLaMA's step: 2 K/V heads for 6 query heads (3 per program, padded to 4), the rotary cache write
        gq, gk = torch.randn(2, 6, 16, generator=g).to(dtype), torch.randn(2, 2, 150, 16, generator=g).to(dtype)
        cos, sin = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
        decode_attention.decode_attention(gq, gk, gk.clone(), lengths, 0.25, gk[:, :, 0], gk[:, :, 1], 1, cos, sin)
        decode_attention.decode_attention(gq, gk[:, :, :40], gk[:, :, :40].clone(), torch.tensor([3, 40]), 0.25,
                                          cos=cos, sin=sin)  # one chunk, rotary without a cache write
        norm.rms_norm(x, w, 1e-6)
        qs = torch.randn(2, 3, 9, 16, generator=g).to(dtype)
        rotary.rotary(qs, torch.randn(2, 9, 8, generator=g), torch.randn(2, 9, 8, generator=g))
        flash_attention.attention(qs, qs, qs, 0.25, True, None)
        flash_attention.attention(torch.cat([qs, qs], 1), qs, qs, 0.25, True, None)  # 2 query heads per K/V head
        flash_attention.attention(qs, qs, qs, 0.25, False, torch.tensor([4, 9]))
        for d in (256, 512):  # the wide-head block sizes (the VQGAN's attention)
            wide = torch.randn(1, 1, 5, d, generator=g).to(dtype)
            flash_attention.attention(wide, wide, wide, 0.25, False, None)
        for rows in (2, 40):
            linear.linear(torch.randn(rows, 64, generator=g).to(dtype), torch.randn(48, 64, generator=g).to(dtype),
                          torch.randn(48, generator=g).to(dtype))
    logits = torch.randn(4, 3000, generator=g)
    params = (torch.ones(2), torch.tensor([5, 0]), torch.tensor([0.9, 1.0]), torch.tensor([True, False]),
              torch.tensor([1, 2]), torch.tensor([0]))
    for guidance in (None, torch.tensor([1.5, 2.0])):
        rows = logits if guidance is not None else logits[:2]
        sampling.sample(rows.half(), *params, guidance, 2500)
        sampling.sample(rows, *params, guidance, None, greedy=True)
        # a continuous batch: per-row step counters and rows of the random stream
        sampling.sample(rows, *params[:-1], torch.tensor([3, 0]), guidance, None, rows=torch.tensor([1, 0]))


def test_every_kernel_variant_compiles_for_sm80_and_sm90(monkeypatch):
    variants = record_launches(monkeypatch)
    exercise_every_launcher()
    # the conv tiles a GPU picks, from the smallest VQGAN level to the largest (run by the
    # interpreter at a tiny shape; 64 input channels so that BLOCK_K is not cut down)
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16):
        for config in {conv.plan(b, pixels, 64, cout, dtype, True)
                       for b, pixels, cout in ((8, 256 * 256, 128), (1, 128 * 128, 256), (1, 16 * 16, 512))}:
            monkeypatch.setattr(conv, "INTERPRETER_CONFIG", config)
            exercise_conv(dtype, g, cin=64, every_variant=False)
    assert {v["kernel"].rsplit(".", 2)[1] for v in variants.values()} >= {
        "norm", "activation", "embedding", "decode_attention", "flash_attention", "linear", "sampling", "conv",
        "rotary"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(ops.__file__).parents[2]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(list(variants.values())),
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
