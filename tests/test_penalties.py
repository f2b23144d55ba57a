"""``ops.penalize``: the repetition penalty and the no-repeat-n-gram ban of text generation.

The reference equals transformers' ``RepetitionPenaltyLogitsProcessor`` followed by
``NoRepeatNGramLogitsProcessor`` (applied one row at a time: its processors take a rectangular batch)
on random logits over awkward shapes - vocabularies of 1, 7 and 50257 columns, history lengths 0, 1,
n - 1, n, n + 1 and long, random, constant and periodic histories (repeated tokens and repeated
n-grams), ids past the vocabulary, penalties below, at and above 1, n-gram sizes 0 to 4, fp32 / fp16
/ bf16 logits with zeros and infinities - both its CPU path and the fixed-shape path it takes on
other devices (run here on CPU). A slow loop oracle, checked against transformers on the same grid,
shows the grid catches the likely bugs: a duplicate token penalized twice, and n-gram conditions off
by one. Hand-made rows pin the same behaviours on every backend. The Triton kernel (its interpreter
on CPU, small shapes; also with 4-position blocks, so a row's history spans many programs) equals
the reference bit for bit, and each of its launch variants compiles for sm_80 and sm_90 (no GPU
needed). The ``gpu`` tests run it and the reference's fixed-shape path on CUDA at real sizes without
a host sync, and replay both in a CUDA graph with new values.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from mmgen_engine import ops
from mmgen_engine.ops import BackendError, penalties, registry
from mmgen_engine.ops.penalties import penalize_reference

triton = pytest.importorskip("triton")

from mmgen_engine.kernels import penalties as penalties_kernel  # noqa: E402  (needs triton)

NGRAM_SIZES = [0, 1, 2, 3, 4]
PENALTIES = [0.5, 1.0, 1.3, 2.0, 1.1, 0.9]


def make_case(vocab, dtype, alphabet, long, seed):
    """One row per (n-gram size, length, history kind): lengths 0, 1, n - 1, n, n + 1 and ``long``;
    histories drawn from ``alphabet`` (a few ids, so tokens and n-grams repeat), constant, or
    periodic. Columns past a row's length hold other in-vocabulary ids, so an implementation reading
    past the sequence shows. Penalties cycle through :data:`PENALTIES`."""
    g = torch.Generator().manual_seed(seed)
    alphabet = torch.tensor(alphabet)
    specs = [(n, length, kind) for n in NGRAM_SIZES for length in sorted({0, 1, n - 1, n, n + 1, long} - {-1})
             for kind in ("random", "constant", "periodic")]
    rows, width = len(specs), long + 3
    history = alphabet[torch.randint(len(alphabet), (rows, width), generator=g)]
    for r, (_, _, kind) in enumerate(specs):
        if kind == "constant":
            history[r] = alphabet[r % len(alphabet)]
        elif kind == "periodic":  # e.g. a b c a b c ...
            history[r] = alphabet[(torch.arange(width) + r) % min(3, len(alphabet))]
    lengths = torch.tensor([length for _, length, _ in specs])
    padding = torch.randint(vocab, (rows, width), generator=g)
    history = torch.where(torch.arange(width) < lengths[:, None], history, padding)
    penalty = torch.tensor([PENALTIES[r % len(PENALTIES)] for r in range(rows)], dtype=torch.float32)
    ngram = torch.tensor([n for n, _, _ in specs])
    logits = torch.randn(rows, vocab, generator=g) * 3
    special = torch.rand(rows, vocab, generator=g)
    logits[special < 0.05] = 0.0
    logits[(special >= 0.05) & (special < 0.08)] = -0.0
    logits[(special >= 0.08) & (special < 0.1)] = float("-inf")
    logits[(special >= 0.1) & (special < 0.11)] = float("inf")
    return logits.to(dtype), history, lengths, penalty, ngram


CASES = {  # id: (vocab, logits dtype, history alphabet (ids >= vocab: past the lm head's vocabulary))
    "V1": (1, torch.float32, [0]),
    "V1-fp16-oov": (1, torch.float16, [0, 1, 3]),
    "V7": (7, torch.float32, [0, 2, 6]),
    "V7-fp16": (7, torch.float16, [1, 3, 5, 4]),
    "V7-bf16-oov": (7, torch.bfloat16, [0, 6, 7, 9]),
    "V50257": (50257, torch.float32, [0, 3, 12345, 50256]),
    "V50257-bf16": (50257, torch.bfloat16, [50256, 7, 0]),
    "V50257-fp16-oov": (50257, torch.float16, [50257, 1, 60000, 2]),
}


def case(name, long=40):
    vocab, dtype, alphabet = CASES[name]
    return make_case(vocab, dtype, alphabet, long, seed=len(CASES) * long + list(CASES).index(name))


def transformers_penalize(logits, history, lengths, penalty, ngram):
    """transformers' processors in generate's order, on the fp32 scores, one row at a time (each
    row's ``input_ids`` is its history prefix); each only where generate would add it."""
    out = []
    for r in range(logits.shape[0]):
        input_ids = history[r:r + 1, :int(lengths[r])]
        scores = logits[r:r + 1].float()
        if float(penalty[r]) != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(float(penalty[r]))(input_ids, scores)
        if int(ngram[r]) > 0:
            scores = NoRepeatNGramLogitsProcessor(int(ngram[r]))(input_ids, scores)
        out.append(scores)
    return torch.cat(out)


def loop_oracle(logits, history, lengths, penalty, ngram, mutant=None):
    """The spec as loops over tokens and windows, with the bugs a test must catch as ``mutant``:
    ``"penalize twice"`` (each occurrence penalizes the running score), ``"skip L == n"`` (the
    n-gram gate one too strict), ``"window +1"`` / ``"window -1"`` (window starts up to ``L - n + 1``
    - reading the column after the sequence - or ``L - n - 1``), ``"suffix -1"`` (compared with
    ``h[L - n:L - 1]``, not the last n - 1 tokens)."""
    out = logits.float().clone()
    vocab = logits.shape[1]
    for r in range(logits.shape[0]):
        full, length, p, n = history[r].tolist(), int(lengths[r]), penalty[r], int(ngram[r])
        seen = set()
        for tok in full[:length]:
            if p != 1 and 0 <= tok < vocab and (tok not in seen or mutant == "penalize twice"):
                s = out[r, tok] if mutant == "penalize twice" else logits[r, tok].float()
                out[r, tok] = s * p if s < 0 else s / p
                seen.add(tok)
        if n < 1 or length + 1 < n or (mutant == "skip L == n" and length == n):
            continue
        last = length - n + {"window +1": 1, "window -1": -1}.get(mutant, 0)
        shift = 1 if mutant == "suffix -1" else 0
        suffix = full[length - n + 1 - shift:length - shift]
        for i in range(last + 1):
            if full[i:i + n - 1] == suffix and 0 <= full[i + n - 1] < vocab:
                out[r, full[i + n - 1]] = float("-inf")
    return out


@pytest.mark.parametrize("shortcuts", [True, False], ids=["cpu-path", "fixed-shape-path"])
@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_transformers(name, shortcuts, monkeypatch):
    """Bit for bit, -inf included. ``fixed-shape-path``: the path the reference takes off CPU (no host
    reads), run here on CPU."""
    if not shortcuts:
        monkeypatch.setattr(penalties, "_host_shortcuts", lambda device: False)
    for long in [40, 300]:
        args = case(name, long)
        out = penalize_reference(*args)
        assert out.dtype == torch.float32 and out.shape == args[0].shape
        expect = transformers_penalize(*args)
        assert torch.equal(out, expect), (long, (out != expect).nonzero().tolist()[:10])


def test_loop_oracle_is_transformers_and_the_grid_catches_its_mutants():
    """The grid above is not degenerate: each likely bug, applied to a faithful loop oracle, changes
    the result on it - so the reference, equal to transformers on this grid, has none of them (and
    the Triton kernel, equal to the reference bit for bit, neither)."""
    mutants = ["penalize twice", "skip L == n", "window +1", "window -1", "suffix -1"]
    caught = set()
    for name in CASES:
        args = case(name)
        expect = transformers_penalize(*args)
        assert torch.equal(loop_oracle(*args), expect), name
        caught |= {m for m in mutants if not torch.equal(loop_oracle(*args, mutant=m), expect)}
    assert caught == set(mutants)


@pytest.fixture(params=["reference", "reference-fixed-shape", "triton", "triton-4-position-blocks"])
def impl(request, monkeypatch):
    """A backend of ``penalize``: the reference's CPU path or its fixed-shape path (taken off CPU),
    the Triton kernel, or the kernel with 4 history positions and 16 columns per program."""
    if request.param == "reference-fixed-shape":
        monkeypatch.setattr(penalties, "_host_shortcuts", lambda device: False)
    if request.param == "triton-4-position-blocks":
        monkeypatch.setattr(penalties_kernel, "BLOCK_T", 4)
        monkeypatch.setattr(penalties_kernel, "BLOCK_V", 16)
    return penalize_reference if request.param.startswith("reference") else penalties_kernel.penalize


def test_hand_made_rows(impl):
    """Score of token v is ``v - 4``. Duplicates penalized once, the n-gram boundaries (no ban at
    L = n - 1, a ban at L = n, the last window bans, the window after the sequence does not), -inf
    over the penalty, n = 1, ids outside the vocabulary, lengths clamped to [0, T], n <= 0 off."""
    vocab = 10
    pad = 9
    rows = [  # history (T = 4), length, penalty, n-gram size, {token: expected score}
        ([1, 1, 1, 8], 4, 2.0, 0, {1: -6.0, 8: 2.0}),  # -3 * 2 once (not -12), 4 / 2 once (not 1)
        ([3, 3, 3, pad], 3, 1.0, 3, {3: "-inf"}),  # L = n: window (3 3 3); (3 3 pad) is past the end
        ([6, 6, pad, pad], 2, 1.0, 3, {}),  # L = n - 1: no window
        ([0, 5, 5, pad], 3, 1.0, 2, {5: "-inf"}),  # the last window (5 5) matches the last token 5
        ([2, 5, 2, 5], 4, 1.0, 2, {2: "-inf"}),  # (5 2) follows the last 5; (2 5) does not
        ([4, 4, pad, pad], 2, 0.5, 2, {4: "-inf"}),  # penalized (0 / 0.5), then banned: -inf wins
        ([7, 0, 7, pad], 3, 2.0, 1, {7: "-inf", 0: "-inf"}),  # n = 1 bans every token of the sequence
        ([-1, 10, 12, 3], 4, 2.0, 0, {3: -2.0}),  # ids outside [0, V) are skipped
        ([-1, 10, 12, 3], 4, 1.0, 1, {3: "-inf"}),
        ([9, 9, 9, 9], 100, 1.0, 2, {9: "-inf"}),  # the length is clamped to T = 4
        ([2, 2, 2, 2], -3, 2.0, 1, {}),  # a negative length is 0
        ([2, 2, 2, 2], 4, 1.0, -2, {}),  # n < 0 is off
        ([6, 1, 6, 1], 4, 0.25, 3, {6: "-inf", 1: -0.75}),  # (6 1 6) after the last (6 1); 1: -3 * 0.25
    ]
    logits = (torch.arange(vocab, dtype=torch.float32) - 4).expand(len(rows), -1).contiguous()
    history = torch.tensor([r[0] for r in rows])
    lengths = torch.tensor([r[1] for r in rows])
    penalty = torch.tensor([r[2] for r in rows])
    ngram = torch.tensor([r[3] for r in rows])
    expect = logits.clone()
    for i, (*_, changed) in enumerate(rows):
        for tok, value in changed.items():
            expect[i, tok] = float(value)
    out = impl(logits, history, lengths, penalty, ngram)
    assert torch.equal(out, expect), [(i, rows[i][0]) for i in range(len(rows)) if not torch.equal(out[i], expect[i])]
    assert torch.equal(logits, (torch.arange(vocab, dtype=torch.float32) - 4).expand(len(rows), -1))  # untouched


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference_bitwise(name):
    args = case(name, long=12)
    out = penalties_kernel.penalize(*args)
    assert out.dtype == torch.float32 and torch.equal(out, penalize_reference(*args))


@pytest.mark.parametrize("name", ["V1-fp16-oov", "V7", "V7-bf16-oov"])
def test_triton_small_blocks_match_reference_bitwise(name, monkeypatch):
    """4 history positions per program (a long history over 10 programs, duplicates and windows split
    across them) and 4 columns per copy program."""
    monkeypatch.setattr(penalties_kernel, "BLOCK_T", 4)
    monkeypatch.setattr(penalties_kernel, "BLOCK_V", 4)
    args = case(name, long=37)
    assert torch.equal(penalties_kernel.penalize(*args), penalize_reference(*args))


def test_edge_values_match_between_backends(impl):
    """What transformers cannot be asked: negative ids, lengths past T and negative, n <= 0 and n > T,
    an empty history (T = 0), penalties of 1 in rows with a ban."""
    g = torch.Generator().manual_seed(11)
    rows, vocab, width = 12, 9, 10
    logits = torch.randn(rows, vocab, generator=g).to(torch.bfloat16)
    history = torch.randint(-3, 12, (rows, width), generator=g)
    history[::3] = history[::3] % 2  # repeats
    lengths = torch.tensor([0, 3, 10, 12, 2**40, -1, -2**40, 5, 10, 10, 9, 1])
    penalty = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 3.0, 0.7, 1.0, 2.5, 1.0, 0.8, 1.2])
    ngram = torch.tensor([2, 0, 3, 1, 2, 1, 2, -1, 11, 10, 2**40, -2**40])
    for hist in [history, history[:, :0]]:
        out = impl(logits, hist, lengths, penalty, ngram)
        assert torch.equal(out, loop_oracle(logits, hist, lengths.clamp(0, hist.shape[1]), penalty, ngram))
    assert torch.equal(impl(logits, history[:, :0], lengths, penalty, ngram), logits.float())


def test_strided_inputs(impl):
    """Row-strided and column-major logits and history, strided per-row tensors."""
    vocab, dtype, alphabet = CASES["V7-fp16"]
    logits, history, lengths, penalty, ngram = make_case(vocab, dtype, alphabet, 9, seed=5)
    rows = logits.shape[0]
    expect = penalize_reference(logits, history, lengths, penalty, ngram)
    wide = torch.zeros(rows, vocab + 5, dtype=dtype)
    wide[:, 2:2 + vocab] = logits
    per_row = [torch.stack([t, t], dim=1)[:, 1] for t in (lengths, penalty, ngram)]  # stride 2
    for lg, hist in [(wide[:, 2:2 + vocab], history), (logits.t().contiguous().t(), history.t().contiguous().t()),
                     (logits, torch.cat([history, history], dim=1)[:, :history.shape[1]])]:
        assert torch.equal(impl(lg, hist, *per_row), expect)


def test_the_path_off_cpu_reads_no_values():
    """On the meta device tensors have shapes but no values: any host read (``.item()``, ``bool()``,
    ``nonzero()``, a shape from values) would raise. The reference's path off CPU runs there, so a
    CUDA graph can capture it."""
    args = [t.to("meta") for t in case("V7-bf16-oov", long=9)]
    out = penalize_reference(*args)
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == args[0].shape


def test_rows_without_controls_are_cast_copies():
    """p == 1 and n <= 0 everywhere: the logits in fp32, as a new tensor (also for fp32 logits)."""
    logits = torch.randn(3, 11)
    args = (torch.randint(0, 11, (3, 6)), torch.tensor([6, 0, 3]), torch.ones(3), torch.tensor([0, 0, -1]))
    for fn in (penalize_reference, penalties_kernel.penalize, ops.penalize):
        out = fn(logits, *args)
        assert torch.equal(out, logits) and out.data_ptr() != logits.data_ptr()
        half = fn(logits.half(), *args)
        assert half.dtype == torch.float32 and torch.equal(half, logits.half().float())


# ---- the public op: checks and dispatch ----

def good_args(rows=2, vocab=5, width=4):
    return (torch.randn(rows, vocab), torch.zeros(rows, width, dtype=torch.int64), torch.full((rows,), width),
            torch.full((rows,), 1.2), torch.full((rows,), 2))


@pytest.mark.parametrize("index,bad,message", [
    (0, torch.randn(5), "logits must be"),
    (0, torch.randn(2, 5, 1), "logits must be"),
    (0, torch.randn(2, 0), "logits must be"),
    (0, torch.randn(0, 5), "logits must be"),
    (0, torch.randn(2, 5).double(), "logits must be float32, float16 or bfloat16"),
    (0, torch.zeros(2, 5, dtype=torch.int64), "logits must be float32, float16 or bfloat16"),
    (1, torch.zeros(3, 4, dtype=torch.int64), "history must be"),
    (1, torch.zeros(4, dtype=torch.int64), "history must be"),
    (1, torch.zeros(2, 4, dtype=torch.int32), "history must be a tensor of int64"),
    (2, torch.full((3,), 4), r"lengths must have shape \[R\]"),
    (2, torch.full((2, 1), 4), r"lengths must have shape \[R\]"),
    (2, torch.full((2,), 4, dtype=torch.int32), "lengths must be a tensor of int64"),
    (3, torch.full((2,), 1.2, dtype=torch.float64), "repetition_penalty must be a tensor of float32"),
    (3, torch.full((1,), 1.2), r"repetition_penalty must have shape \[R\]"),
    (4, torch.full((2,), 2, dtype=torch.int32), "no_repeat_ngram_size must be a tensor of int64"),
    (4, torch.tensor(2), r"no_repeat_ngram_size must have shape \[R\]"),
    (1, torch.zeros(2, 4, dtype=torch.int64, device="meta"), "history must be a tensor of int64 on cpu"),
    (4, torch.full((2,), 2, device="meta"), "no_repeat_ngram_size must be a tensor of int64 on cpu"),
])
def test_bad_shapes_dtypes_and_devices_raise_value_error(index, bad, message):
    args = list(good_args())
    ops.penalize(*args)  # the good arguments pass
    args[index] = bad
    with pytest.raises(ValueError, match=message):
        ops.penalize(*args)


def test_registered_backends_and_selection(monkeypatch):
    """reference and triton; the Triton kernel is the default on CUDA; forcing a backend without an
    implementation (every op on ``cuda``) is a BackendError, never a silent fallback."""
    assert ops.available_backends()["penalize"] == ["reference", "triton"]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert registry.resolve("penalize", "cuda", dtype, None) is penalties_kernel.penalize
        assert registry.resolve("penalize", "cpu", dtype, None) is penalize_reference
        with pytest.raises(BackendError, match="penalize.*'cuda' on cuda"):
            registry.resolve("penalize", "cuda", dtype, "cuda")
    args = case("V7-fp16", long=9)
    expect = penalize_reference(*args)
    monkeypatch.setenv("MMGEN_BACKEND", "triton")
    assert registry.dispatch("penalize", args[0]) is penalties_kernel.penalize
    assert torch.equal(ops.penalize(*args), expect)
    monkeypatch.setenv("MMGEN_BACKEND", "penalize=triton,sample=reference")
    assert torch.equal(ops.penalize(*args), expect)
    for forced in ["cuda", "penalize=cuda"]:
        monkeypatch.setenv("MMGEN_BACKEND", forced)
        with pytest.raises(BackendError, match="penalize.*'cuda' on cpu/float16"):
            ops.penalize(*args)
    monkeypatch.setenv("MMGEN_BACKEND", "reference")
    assert torch.equal(ops.penalize(*args), expect)


# ---- on a GPU: real sizes, no host sync, and replay in a CUDA graph ----

def cuda_case(rows, vocab, width, dtype, seed):
    """A decode batch at real sizes: histories from 64 ids (tokens and short n-grams repeat) of every
    length up to ``width``, every penalty kind and n-gram sizes 0 to 4."""
    g = torch.Generator().manual_seed(seed)
    alphabet = torch.randint(vocab, (64,), generator=g)
    history = alphabet[torch.randint(64, (rows, width), generator=g)]
    history[::4, 1::2] = history[::4, :1]  # some rows repeat one token every other position
    lengths = torch.randint(0, width + 1, (rows,), generator=g)
    lengths[:3] = torch.tensor([0, width, 3])
    penalty = torch.tensor(PENALTIES)[torch.randint(len(PENALTIES), (rows,), generator=g)]
    ngram = torch.tensor(NGRAM_SIZES)[torch.randint(len(NGRAM_SIZES), (rows,), generator=g)]
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    return [t.cuda() for t in (logits, history, lengths, penalty, ngram)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference_on_cuda_without_host_sync(dtype):
    """GPT-2's vocabulary, 1024 positions: the kernel and the reference's fixed-shape path on CUDA
    equal the CPU reference bit for bit, and neither synchronizes with the host."""
    args = cuda_case(32, 50257, 1024, dtype, seed=1)
    expect = penalize_reference(*(t.cpu() for t in args))
    assert (expect == float("-inf")).any() and (expect != args[0].float().cpu()).any()
    penalties_kernel.penalize(*args), penalize_reference(*args)  # compiles and warms up (may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, ref = penalties_kernel.penalize(*args), penalize_reference(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(ref.cpu(), expect)
    assert torch.equal(out.cpu(), expect), (out.cpu() != expect).nonzero().tolist()[:10]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cuda_graph_replay_with_new_history(backend, monkeypatch):
    """``ops.penalize`` captured once, replayed after the caller rewrote the history, the lengths
    (a token appended per step), the penalties and the n-gram sizes in place: each replay equals an
    eager call on the new values."""
    monkeypatch.setenv("MMGEN_BACKEND", backend)
    rows, vocab, width = 8, 50257, 256
    static = cuda_case(rows, vocab, width, torch.float16, seed=2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.penalize(*static)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.penalize(*static)
    seen, expects = [], []
    for step in range(4):
        new = cuda_case(rows, vocab, width, torch.float16, seed=10 + step)
        if step == 3:  # a decode step: the same rows one token longer
            new = [t.clone() for t in seen[-1]]
            new[1][torch.arange(rows, device="cuda"), new[2].clamp(max=width - 1)] = 7
            new[2] = (new[2] + 1).clamp(max=width)
        for buffer, value in zip(static, new):
            buffer.copy_(value)
        graph.replay()
        expect = penalize_reference(*(t.cpu() for t in new))
        assert torch.equal(out.cpu(), expect), step
        seen.append(new)
        expects.append(expect)
    assert all(not torch.equal(a, b) for a, b in zip(expects, expects[1:]))  # every replay saw new values


def test_kernels_compile_for_sm80_and_sm90(monkeypatch):
    """The interpreter is more forgiving than Triton's compiler: every launch variant of the kernels
    (each logits dtype) compiles to machine code for the engine's GPUs, without one (the recording and
    compiling of tests/test_kernels_compile.py)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches in Triton's interpreter; a GPU machine compiles by running the kernels")
    import test_kernels_compile as compile_test

    variants = compile_test.record_launches(monkeypatch)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        logits = torch.randn(3, 50, generator=g).to(dtype)
        penalties_kernel.penalize(logits, torch.randint(0, 5, (3, 9), generator=g), torch.tensor([9, 4, 0]),
                                  torch.tensor([1.5, 1.0, 0.5]), torch.tensor([2, 3, 0]))
    assert {v["kernel"].rsplit(".", 1)[1] for v in variants.values()} == {"_copy_kernel", "_penalty_kernel",
                                                                         "_ngram_kernel"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(ops.__file__).parents[2]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", compile_test.COMPILE], input=json.dumps(list(variants.values())),
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
