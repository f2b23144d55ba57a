"""The CUDA kernels of csrc/ (the ``cuda`` backend) against the plain-torch references.

Every check runs twice: on the CPU, with the kernels compiled by g++ against the SIMT emulator
(tests/native: real block/warp semantics, barriers and shuffles; the wrappers of
``mmgen_engine.ops.cuda_ops`` unchanged, only ``_C`` swapped for the emulated build), at the shapes
of the Triton kernels' tests; and, marked ``gpu``, the same checks on a GPU through the real
``mmgen_engine._C`` plus real sizes. The wrappers' input checks (shapes, dtypes, strides, token ids
outside the vocabulary, lengths beyond the cache) are tested to fail before any launch.
"""
from __future__ import annotations

import emulated
import pytest
import test_kernels
import torch
from test_kernels import close, rand
from test_kernels_sampling import CASES, grid_params, make_logits

from mmgen_engine import ops
from mmgen_engine.errors import BackendError, InputError
from mmgen_engine.ops import cuda_ops, registry
from mmgen_engine.ops.attention import decode_attention_reference
from mmgen_engine.ops.norm import layer_norm_reference
from mmgen_engine.ops.sampling import sample_reference

gpu = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=gpu)])
def device(request, monkeypatch):
    """Where the kernels run: "cpu" through the emulator, or "cuda" through the real library."""
    if request.param == "emulated":
        monkeypatch.setattr(cuda_ops, "_C", emulated.load())
        return "cpu"
    if not cuda_ops._C.cuda:
        pytest.fail("mmgen_engine._C was built without CUDA on a machine with a GPU")
    return "cuda"


def check_norms(rows, dim, dtype, device, weight_dtype=torch.float32):
    test_kernels.check_norms(rows, dim, dtype, device, kernels=cuda_ops, weight_dtype=weight_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [((1,), 1), ((3,), 7), ((2, 5), 97), ((17,), 768), ((1,), 769), ((2,), 4104),
                                      ((2,), 5125)])
def test_layer_norms(rows, dim, dtype, device):
    check_norms(rows, dim, dtype, device)
    check_norms(rows, dim, dtype, device, weight_dtype=dtype)


def test_layer_norm_of_unaligned_views(device):
    x = rand(3, 65, dtype=torch.float16, device=device)[:, 1:]  # 2-byte offset rows: scalar loads
    w, b = rand(64, device=device, seed=1), rand(64, device=device, seed=2)
    close(cuda_ops.layer_norm(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5))
    # wide rows, contiguous but 2 bytes off (scalar loads), a non-contiguous bias
    wide = rand(2 * 8192 + 1, dtype=torch.bfloat16, device=device)[1:].view(2, 8192)
    w, b = rand(8192, device=device, seed=1), rand(16384, device=device, seed=2)[::2]
    close(cuda_ops.layer_norm(wide, w, b, 1e-5), layer_norm_reference(wide, w, b, 1e-5))
    too_wide = torch.zeros(1, 16385, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match=r"row width 16385 outside \[1, 16384\]"):
        cuda_ops.layer_norm(too_wide, too_wide[0], too_wide[0], 1e-5)


# ---- decode attention -------------------------------------------------------------------------

def check_decode_attention(b, h, s, d, dtype, device, lengths=None, fused_write=False):
    return test_kernels.check_decode_attention(b, h, s, d, dtype, device, lengths, fused_write,
                                               fn=cuda_ops.decode_attention)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused_write", [False, True])
@pytest.mark.parametrize("b,h,s,d", [(1, 1, 1, 8), (3, 5, 7, 24), (2, 3, 97, 64), (1, 2, 300, 16), (2, 1, 9, 12),
                                     (1, 2, 5, 200), (1, 1, 3, 260), (1, 1, 2, 512)])
def test_decode_attention(b, h, s, d, fused_write, dtype, device):
    # d = 12, 260: rows of 24 / 520 bytes, not 16-byte multiples (scalar loads); 200: 25 vectors over
    # 32 lanes; 512: two vectors per lane; s = 300: two splits
    check_decode_attention(b, h, s, d, dtype, device, fused_write=fused_write)


def test_decode_attention_lengths_at_the_edges_splits_and_strided_views(device):
    # lengths 1 and the full cache, over three splits; k/v are views of a larger cache
    check_decode_attention(2, 3, 600, 32, torch.float16, device, lengths=torch.tensor([1, 600]), fused_write=True)
    q = rand(2, 3, 32, dtype=torch.bfloat16, device=device, seed=1)
    cache_k, cache_v = (rand(2, 3, 700, 32, dtype=torch.bfloat16, device=device, seed=i) for i in (2, 3))
    lengths = torch.tensor([5, 257], device=device)
    k, v = cache_k[:, :, :300], cache_v[:, :, :300]
    close(cuda_ops.decode_attention(q, k, v, lengths, 0.2), decode_attention_reference(q, k, v, lengths, 0.2))


def check_grouped_decode_attention(b, group, h, s, d, dtype, device, lengths=None):
    return test_kernels.check_grouped_decode_attention(b, group, h, s, d, dtype, device, lengths,
                                                       fn=cuda_ops.decode_attention)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 3, 5])
@pytest.mark.parametrize("b,h,s,d", [(1, 1, 1, 8), (3, 5, 7, 24), (2, 1, 9, 12), (2, 2, 300, 64)])
def test_grouped_decode_attention(b, h, s, d, group, dtype, device):
    # d = 12: scalar loads; s = 300: two splits, the second partial
    check_grouped_decode_attention(b, group, h, s, d, dtype, device)


def test_grouped_decode_attention_lengths_at_the_edges_splits_and_strided_views(device):
    # lengths 1 and the full cache, over three splits (600 keys)
    check_grouped_decode_attention(2, 3, 3, 600, 32, torch.float16, device, lengths=torch.tensor([1, 600]))
    q = rand(2 * 2, 3, 96, dtype=torch.bfloat16, device=device, seed=1)[:, :, 32:64]  # rows of a fused projection
    cache_k, cache_v = (rand(2, 3, 700, 32, dtype=torch.bfloat16, device=device, seed=i) for i in (2, 3))
    lengths = torch.tensor([257, 5], device=device)
    k, v = cache_k[:, :, :300], cache_v[:, :, :300]
    close(cuda_ops.decode_attention(q, k, v, lengths, 0.2, group=2),
          decode_attention_reference(q, k, v, lengths, 0.2, group=2))


def test_grouped_decode_attention_rejects_bad_input_before_any_launch(device):
    q = rand(4, 3, 16, dtype=torch.float16, device=device)
    k, v, new = (rand(*shape, dtype=torch.float16, device=device, seed=i)
                 for i, shape in enumerate([(2, 3, 10, 16), (2, 3, 10, 16), (2, 3, 16)], 1))
    ok = torch.tensor([4, 10], device=device)
    before = k.clone()
    with pytest.raises(ValueError, match="group=2 with new_k/new_v: a cache write needs one query row per cache row"):
        cuda_ops.decode_attention(q, k, v, ok, 0.25, new, new, group=2)
    assert torch.equal(k, before)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match=f"group must be an int >= 1, got {bad!r}"):
            cuda_ops.decode_attention(q, k, v, ok, 0.25, group=bad)
    with pytest.raises(ValueError, match=r"q must have shape \(6, 3, 16\)"):
        cuda_ops.decode_attention(q, k, v, ok, 0.25, group=3)
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        cuda_ops.decode_attention(q, k, v, ok.repeat_interleave(2), 0.25, group=2)
    with pytest.raises(InputError, match=r"decode_attention: lengths holds 11, outside \[1, 10\]"):
        cuda_ops.decode_attention(q, k, v, torch.tensor([4, 11], device=device), 0.25, group=2)


def test_decode_attention_rejects_bad_input_before_any_launch(device):
    q = rand(2, 3, 16, dtype=torch.float16, device=device)
    k, v = (
        rand(2, 3, 10, 16, dtype=torch.float16, device=device),
        rand(2, 3, 10, 16, dtype=torch.float16, device=device),
    )
    new_k, new_v = (
        rand(2, 3, 16, dtype=torch.float16, device=device),
        rand(2, 3, 16, dtype=torch.float16, device=device),
    )
    before = k.clone()
    for lengths, bad in (([0, 4], "0"), ([4, 11], "11"), ([-3, 2], "-3")):
        with pytest.raises(InputError, match=rf"decode_attention: lengths holds {bad}, outside \[1, 10\]"):
            cuda_ops.decode_attention(q, k, v, torch.tensor(lengths, device=device), 0.25, new_k, new_v)
    assert torch.equal(k, before)  # the fused cache write never ran
    ok = torch.tensor([4, 10], device=device)
    with pytest.raises(TypeError, match="lengths must be int64"):
        cuda_ops.decode_attention(q, k, v, ok.int(), 0.25)
    with pytest.raises(TypeError, match="q must be float16, bfloat16"):
        cuda_ops.decode_attention(q.float(), k.float(), v.float(), ok, 0.25)
    with pytest.raises(ValueError, match=r"v must have shape \(2, 3, 10, 16\)"):
        cuda_ops.decode_attention(q, k, v[:, :, :9], ok, 0.25)
    with pytest.raises(ValueError, match="k needs a unit last stride"):
        cuda_ops.decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, ok, 0.25)
    with pytest.raises(ValueError, match="new_k and new_v go together"):
        cuda_ops.decode_attention(q, k, v, ok, 0.25, new_k, None)
    wide = rand(1, 1, 1, 520, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match=r"head dim 520 outside \[1, 512\]"):
        cuda_ops.decode_attention(wide[:, :, 0], wide, wide, torch.ones(1, dtype=torch.int64, device=device), 1.0)


def check_gqa_decode_attention(b, group, hq, hkv, s, d, dtype, device, fused_write, rope, lengths=None):
    return test_kernels.check_gqa_decode_attention(b, group, hq, hkv, s, d, dtype, device, fused_write, rope,
                                                   lengths, fn=cuda_ops.decode_attention)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused_write,rope", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("b,hq,hkv,s,d", [(1, 4, 1, 1, 8), (3, 6, 2, 300, 24), (2, 8, 2, 9, 64), (2, 3, 3, 7, 16),
                                          (1, 6, 1, 5, 12), (2, 16, 2, 40, 128)])
def test_gqa_decode_attention(b, hq, hkv, s, d, dtype, fused_write, rope, device):
    # query heads per block: 4 (hq/hkv 4, 8), 1 (3, 1) and, on the scalar path (d = 12), 1 for 6;
    # s = 300: two splits
    check_gqa_decode_attention(b, 1, hq, hkv, s, d, dtype, device, fused_write, rope)


@pytest.mark.parametrize("rope", [False, True])
def test_gqa_decode_attention_grouped_rows_and_edges(rope, device):
    check_gqa_decode_attention(2, 3, 8, 4, 70, 32, torch.float16, device, False, rope)  # 2 heads per block
    check_gqa_decode_attention(2, 1, 8, 2, 600, 32, torch.bfloat16, device, True, rope, lengths=torch.tensor([1, 600]))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv", [1, 8, 32])
def test_gpu_gqa_decode_attention_at_llama_sizes(dtype, hkv):
    """32 query heads of 128 over 1, 8 and 32 K/V heads (4, 2... heads per block), many splits."""
    check_gqa_decode_attention(4, 1, 32, hkv, 4096, 128, dtype, "cuda", True, True)
    check_gqa_decode_attention(2, 3, 32, hkv, 577, 128, dtype, "cuda", False, True)


def test_gqa_decode_attention_rejects_bad_input_before_any_launch(device):
    q = rand(2, 6, 16, dtype=torch.float16, device=device)
    k = rand(2, 4, 10, 16, dtype=torch.float16, device=device)
    ok = torch.tensor([4, 10], device=device)
    cos = torch.ones(2, 8, device=device)
    with pytest.raises(ValueError, match=r"decode_attention: q must have shape \(2, 4, 16\)"):  # 4 does not divide 6
        cuda_ops.decode_attention(q, k, k, ok, 0.25)
    with pytest.raises(ValueError, match=r"new_k must have shape \(2, 2, 16\)"):
        cuda_ops.decode_attention(q, k[:, :2], k[:, :2], ok, 0.25, q, q)
    with pytest.raises(ValueError, match="cos and sin go together"):
        cuda_ops.decode_attention(q, k[:, :2], k[:, :2], ok, 0.25, cos=cos)
    with pytest.raises(TypeError, match="sin must be float32"):
        cuda_ops.decode_attention(q, k[:, :2], k[:, :2], ok, 0.25, cos=cos, sin=cos.half())
    with pytest.raises(ValueError, match=r"cos must have shape \(2, 8\)"):
        cuda_ops.decode_attention(q, k[:, :2], k[:, :2], ok, 0.25, cos=cos[:, :4], sin=cos)


# ---- image-token gather -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape,vocab,dim", [((1,), 1, 1), ((3,), 97, 24), ((2, 7), 1001, 64), ((2, 3, 5), 50, 12),
                                             ((9,), 8192, 128)])
def test_token_gather(shape, vocab, dim, with_bias, dtype, device):
    test_kernels.check_token_gather(shape, vocab, dim, with_bias, dtype, device, fn=cuda_ops.token_gather)


def test_token_gather_of_a_strided_table_and_no_tokens(device):
    table = rand(40, 33, dtype=torch.bfloat16, device=device)[:, 1:]  # rows 66 bytes apart
    tokens = torch.tensor([[3, 39], [0, 7]], device=device)
    assert torch.equal(cuda_ops.token_gather(tokens, table), table[tokens])
    assert cuda_ops.token_gather(tokens[:0], table).shape == (0, 2, 32)


def test_token_gather_kernel_clamps_ids_it_is_not_protected_from(device):
    """Inside a captured graph the wrapper cannot check ids: the kernel clamps them (stays in bounds)."""
    table = rand(16, 8, dtype=torch.float16, device=device)
    tokens = torch.tensor([-5, 3, 16, 99], device=device)
    out = torch.empty(4, 8, dtype=torch.float16, device=device)
    cuda_ops._launch("token_gather", table, tokens.data_ptr(), table.data_ptr(), 0, out.data_ptr(),
                     cuda_ops.DTYPES[table.dtype], 4, 16, 8, 8, True)
    assert torch.equal(out, table[torch.tensor([0, 3, 15, 15], device=device)])


def test_token_gather_rejects_ids_outside_the_codebook(device):
    table = rand(16, 8, dtype=torch.float16, device=device)
    for bad in (16, -1):
        with pytest.raises(InputError, match=rf"tokens holds {bad}, outside \[0, 15\] \(the codebook has 16"):
            cuda_ops.token_gather(torch.tensor([[1, bad]], device=device), table)
    with pytest.raises(TypeError, match="tokens must be int64"):
        cuda_ops.token_gather(torch.tensor([1], dtype=torch.int32, device=device), table)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        cuda_ops.token_gather(torch.tensor([1], device=device), table, table[0, :4])


# ---- sampling ---------------------------------------------------------------------------------

def check_sample(logits, *params, offset, guidance=None, vocab_limit=None, device="cpu"):
    args = [t.to(device) for t in (logits, *params, torch.tensor([offset]))]
    if guidance is not None:
        guidance = guidance.to(device)
    out = cuda_ops.sample(*args, guidance, vocab_limit)
    ref = sample_reference(*args, guidance, vocab_limit)
    assert out.dtype == torch.int64 and torch.equal(out, ref), (offset, out.tolist(), ref.tolist())
    return out


@pytest.mark.parametrize("batch,vocab,guided,vocab_limit,kind,dtype", CASES)
def test_sample_matches_reference(batch, vocab, guided, vocab_limit, kind, dtype, device):
    g = torch.Generator().manual_seed(batch * vocab)
    logits = make_logits(2 * batch if guided else batch, vocab, kind, dtype, g)
    guidance = (torch.rand(batch, generator=g) * (1 if kind == "-inf" else 4)) if guided else None
    params = grid_params(batch, vocab_limit or vocab, g)
    for offset in [0, 2**32 + 5]:
        check_sample(logits, *params, offset=offset, guidance=guidance, vocab_limit=vocab_limit, device=device)


def test_sample_large_vocabulary_bf16_and_greedy(device):
    """A GPT-2-sized row (1024 threads), bf16 logits, and the greedy promise."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 50257, generator=g) * 3).bfloat16()
    params = (torch.tensor([0.8, 1.0]), torch.tensor([50, 0]), torch.tensor([0.9, 0.95]), torch.tensor([True, True]),
              torch.tensor([123, 4]))
    check_sample(logits, *params, offset=7, device=device)
    args = [t.to(device) for t in (logits, *params, torch.tensor([7]))]
    assert torch.equal(cuda_ops.sample(*args, greedy=True), logits.float().argmax(-1).to(device))


def test_sample_top_p_candidate_paths(device):
    """Rows over 5000 columns (more than the kernel's 2048 shared-memory candidates) taking each
    top-p path: a peaked row (the threshold among the 2048 largest), top-k 3000 then top-p (the
    survivors trimmed to 2048), a flat row (the 2048 largest hold too little mass: the search
    over the whole row), ties overflowing the copy (whole row), and top-k 40 (all survivors copied)."""
    g = torch.Generator().manual_seed(9)
    peaked = torch.randn(5, 5000, generator=g) * 3
    ties = torch.randint(-2, 3, (1, 5000), generator=g).float()
    logits = torch.cat([peaked, ties])
    params = (torch.tensor([0.3, 1.0, 30.0, 1.0, 1.0, 1.0]), torch.tensor([0, 3000, 0, 40, 0, 0]),
              torch.tensor([0.9, 0.9, 0.6, 0.8, 1.0, 0.5]), torch.ones(6, dtype=torch.bool),
              torch.arange(6) * 977)
    for offset in range(8):
        check_sample(logits, *params, offset=offset, device=device)


def test_sample_high_temperature_draws_cover_exactly_the_kept_set(device):
    """Near-uniform draws over the kept set: any difference in the thresholds would show."""
    logits = torch.tensor([[4.0, 1.0, 3.0, 3.0, 2.5, 0.0, 3.0, -1.0]]).expand(2, -1).contiguous()
    params = (torch.full((2,), 1e4), torch.tensor([3, 0]), torch.tensor([1.0, 0.6]), torch.tensor([True, True]),
              torch.tensor([1, 2]))
    seen = {tuple(check_sample(logits, *params, offset=o, device=device).tolist()) for o in range(24)}
    assert {t[0] for t in seen} == {0, 2, 3, 6}
    assert {t[1] for t in seen} == {0, 2, 3, 4, 6}


def test_sample_gives_the_triton_samplers_tokens_for_a_seed(device):
    triton_sampling = pytest.importorskip("mmgen_engine.kernels.sampling")
    if device == "cpu" and "cpu" not in registry.TRITON_DEVICES:
        pytest.skip("Triton's interpreter is not enabled")
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 300, generator=g) * 2).to(device)
    params = [t.to(device) for t in (torch.ones(4), torch.tensor([0, 10, 0, 300]), torch.tensor([1.0, 1.0, 0.8, 0.5]),
                                     torch.ones(4, dtype=torch.bool), torch.tensor([1, 2, 3, 2**40]))]
    for offset in range(3):
        step = torch.tensor([offset], device=device)
        assert torch.equal(cuda_ops.sample(logits, *params, step), triton_sampling.sample(logits, *params, step))


def test_sample_greedy_row_of_nan_gives_token_0(device):
    logits = torch.full((2, 300), float("nan"))
    logits[1, 7] = 1.0
    params = (torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.ones(2), torch.zeros(2, dtype=torch.bool),
              torch.tensor([1, 2]))
    args = [t.to(device) for t in (logits, *params, torch.tensor([0]))]
    out = cuda_ops.sample(*args)
    assert out[0] == 0 and 0 <= out[1] < 300  # never the out-of-vocabulary index n (NaNs are skipped)


def test_sample_non_contiguous_logits(device):
    wide = torch.randn(3, 120, generator=torch.Generator().manual_seed(3))
    params = (torch.ones(3), torch.tensor([5, 0, 0]), torch.tensor([1.0, 0.9, 1.0]), torch.tensor([True, True, False]),
              torch.tensor([1, 2, 3]))
    for logits in [wide[:, :97], wide.t().contiguous().t()]:  # row stride 120; column-major
        check_sample(logits, *params, offset=0, device=device)


# ---- the registry -----------------------------------------------------------------------------

def test_cuda_backend_registration_and_per_op_forcing(monkeypatch):
    have = ops.available_backends()
    expected = {"decode_attention", "layer_norm", "add_layer_norm", "sample", "token_gather"}
    if cuda_ops._C.cuda:
        assert all("cuda" in have[op] for op in expected)
        assert registry.resolve("decode_attention", "cuda", torch.float16, "cuda") is cuda_ops.decode_attention
        assert registry.resolve("sample", "cuda", torch.float32, None) is not cuda_ops.sample  # triton first, for now
    x = torch.randn(2, 8)
    monkeypatch.setenv("MMGEN_BACKEND", "layer_norm=cuda, sample=reference")
    assert registry.forced_backend("layer_norm") == "cuda" and registry.forced_backend("linear") is None
    with pytest.raises(BackendError, match="layer_norm.*'cuda' on cpu/float32"):
        ops.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5)
    torch.testing.assert_close(ops.linear(x, torch.eye(8), None), x)  # not named: chosen as usual
    monkeypatch.setenv("MMGEN_BACKEND", "layer_norm=fast")
    with pytest.raises(BackendError, match="'layer_norm=fast' is not op=backend"):
        ops.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5)
    monkeypatch.setenv("MMGEN_BACKEND", "layernorm=cuda")
    with pytest.raises(BackendError, match="'layernorm=cuda' is not op=backend"):
        ops.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5)


# ---- GPU only: real sizes, CUDA graphs --------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_real_sizes(dtype):
    assert cuda_ops._C.cuda
    for rows, dim in [((1,), 768), ((16,), 768), ((4, 197), 768), ((3,), 1031), ((8,), 4096)]:
        check_norms(rows, dim, dtype, "cuda")
    for b, h, s, d in [(1, 12, 1024, 64), (16, 12, 197, 64), (16, 12, 4096, 64), (3, 5, 97, 24), (4, 16, 256, 128)]:
        check_decode_attention(b, h, s, d, dtype, "cuda", fused_write=True)
    for b, group, h, s, d in [(4, 5, 12, 197, 64), (1, 4, 12, 4096, 64), (16, 2, 16, 256, 128)]:
        check_grouped_decode_attention(b, group, h, s, d, dtype, "cuda")
    test_kernels.check_token_gather((4, 32, 32), 8192, 128, True, dtype, "cuda", fn=cuda_ops.token_gather)
    g = torch.Generator().manual_seed(1)
    logits = make_logits(32, 50257, "randn", dtype, g)
    params = grid_params(16, 16384, g)
    for offset in (0, 2**32 + 5):
        check_sample(logits, *params, offset=offset, guidance=torch.rand(16, generator=g) * 4, vocab_limit=16384,
                     device="cuda")


@gpu
def test_gpu_cuda_graph_replay_of_decode_attention_and_sampling():
    """Captured calls (no value checks, no syncs) replay with new lengths and a new offset."""
    device = torch.device("cuda")
    q, k, v = (rand(*shape, dtype=torch.float16, device=device, seed=i)
               for i, shape in enumerate([(4, 12, 64), (4, 12, 512, 64), (4, 12, 512, 64)]))
    lengths = torch.tensor([1, 100, 300, 512], device=device)
    logits = rand(4, 50257, device=device) * 3
    params = [t.to(device) for t in (torch.ones(4), torch.tensor([0, 50, 0, 5]), torch.tensor([1.0, 0.9, 0.9, 1.0]),
                                     torch.ones(4, dtype=torch.bool), torch.arange(4))]
    offset = torch.zeros(1, dtype=torch.int64, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_ops.decode_attention(q, k, v, lengths, 0.125)
    torch.cuda.current_stream().wait_stream(stream)
    beams = rand(4 * 3, 12, 64, dtype=torch.float16, device=device, seed=5)  # 3 query rows per cache row
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_ops.decode_attention(q, k, v, lengths, 0.125)
        grouped = cuda_ops.decode_attention(beams, k, v, lengths, 0.125, group=3)
        tokens = cuda_ops.sample(logits, *params, offset)
    for step in range(3):
        lengths.copy_(torch.tensor([1 + step, 100 - step, 300, 512 - step]))
        offset.fill_(step)
        graph.replay()
        torch.testing.assert_close(out, decode_attention_reference(q, k, v, lengths, 0.125), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(grouped, decode_attention_reference(beams, k, v, lengths, 0.125, group=3),
                                   atol=2e-3, rtol=2e-3)
        assert torch.equal(tokens, sample_reference(logits, *params, offset.clone()))


# ---- end to end: the captioning decode loop on the CUDA kernels -------------------------------

CUDA_OPS = ("add_layer_norm", "decode_attention", "layer_norm", "sample")


@pytest.fixture
def cuda_kernels_on_cpu(monkeypatch):
    """The cuda backend's registrations opened to CPU tensors, running the emulated kernels."""
    monkeypatch.setattr(cuda_ops, "_C", emulated.load())
    for op in CUDA_OPS:
        impl = registry._TABLE[op].get("cuda") or registry.Impl(
            f"mmgen_engine.ops.cuda_ops:{op}", frozenset(), frozenset(DTYPES))
        monkeypatch.setitem(registry._TABLE[op], "cuda", registry.Impl(impl.fn, impl.devices | {"cpu"}, impl.dtypes))
    registry.resolve.cache_clear()
    yield
    registry.resolve.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_captioning_decode_on_the_cuda_kernels_gives_the_reference_tokens(cuda_kernels_on_cpu, monkeypatch, tmp_path,
                                                                           dtype, sampled):
    """ViT + GPT-2 with cross-attention: self-attention with the fused cache write, cross-attention
    over the encoder cache, residual + LayerNorm and the sampler all on the CUDA kernels."""
    from hf_models import IMAGE, make_model, save

    import mmgen_engine as mm

    checkpoint = mm.convert(save(make_model(seed=21), tmp_path / "hf"), tmp_path / "engine")
    monkeypatch.setenv("MMGEN_CPU_BF16_COMPUTE", "bfloat16")  # the kernels take fp16/bf16, not CPU bf16 storage
    pipe = mm.load(checkpoint, dtype=dtype)
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    sampling = mm.SamplingParams(do_sample=True, temperature=0.8, top_k=7, top_p=0.9, seed=11) if sampled else None
    monkeypatch.setenv("MMGEN_BACKEND", "reference")
    ref = pipe.generate_ids(pixels, 12, sampling=sampling)
    monkeypatch.setenv("MMGEN_BACKEND", ",".join(f"{op}=cuda" for op in CUDA_OPS))
    assert registry.dispatch("decode_attention", torch.zeros(1, dtype=dtype)) is cuda_ops.decode_attention
    out = pipe.generate_ids(pixels, 12, sampling=sampling)
    assert torch.equal(out, ref)
    assert (ref != ref[:, :1]).any()  # not a degenerate constant output


@gpu
def test_gpu_captioning_on_the_cuda_kernels_graphs_match_eager(monkeypatch, tmp_path):
    """The runtime's captured decode steps (no value checks inside the capture) give the eager steps'
    tokens with the CUDA kernels selected, greedy and sampled."""
    from hf_models import IMAGE, make_model, save

    import mmgen_engine as mm

    checkpoint = mm.convert(save(make_model(seed=21), tmp_path / "hf"), tmp_path / "engine")
    monkeypatch.setenv("MMGEN_BACKEND", ",".join(f"{op}=cuda" for op in CUDA_OPS))
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    graphed = mm.load(checkpoint, device="cuda", dtype=torch.float16)
    eager = mm.load(checkpoint, device="cuda", dtype=torch.float16, cuda_graphs=False)
    assert registry.dispatch("sample", torch.zeros(1, device="cuda")) is cuda_ops.sample
    for sampling in (None, mm.SamplingParams(do_sample=True, temperature=0.8, top_k=7, top_p=0.9, seed=11)):
        assert torch.equal(graphed.generate_ids(pixels, 16, sampling=sampling),
                           eager.generate_ids(pixels, 16, sampling=sampling))
