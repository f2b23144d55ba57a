"""2-D convolution as an implicit GEMM with fused input and output stages, and GroupNorm.

``conv2d`` computes (the spec is :func:`mmgen_engine.ops.conv.conv2d_reference`)::

    out = residual + scale * (conv2d(act(group_norm(up(x))), weight, stride 1, zero padding) + bias)

with every stage optional: ``up`` a nearest 2x upsample, the GroupNorm's ``(gamma, beta, groups,
eps)``, ``act`` ReLU or SiLU. ``x [B, Cin, H, W]`` is read channels-last (NHWC; copied to it if it
is not), ``weight [Cout, Cin, k, k]`` through its strides (a channels-last weight makes the kernel's
reads contiguous along ``Cin``), the residual through its strides; the output is a new channels-last
``[B, Cout, H', W']`` in ``x``'s dtype.

The GEMM: ``M = B H' W'`` output pixels, ``N = Cout``, ``K = k k Cin``. One program computes a
``BLOCK_M x BLOCK_N`` output tile of one image, walking ``K`` as one loop over (kernel tap, block
of ``BLOCK_K`` input channels), so the GPU pipeliner sees a single loop however small ``Cin`` is.
For each step it gathers the input tile straight from ``x``: the upsample is folded into the
indexing (output pixel ``(y, x)`` at tap ``(i, j)`` reads ``x[(y + i - p) // 2, (x + j - p) // 2]``,
so no upsampled tensor exists), the GroupNorm is one fused multiply-add with per-(image, channel)
``scale = gamma rstd`` and ``shift = beta - mean gamma rstd``, then the activation, then the zero
padding (padded positions are zero *after* norm and activation, as in the reference). Products
accumulate in fp32 with ``tl.dot`` ("ieee" for fp32 inputs: no TF32). The epilogue adds the bias,
scales, adds the residual and casts.

The GroupNorm statistics come first, from two small kernels over ``x`` (a nearest upsample repeats
every pixel four times, so ``up(x)`` has the same mean and variance): ``_gn_stats`` reduces chunks
of ``GN_CHUNK`` pixels of one (image, group) to a mean and a sum of squared deviations (per tile,
merged with Chan's parallel formula: no ``E[x^2] - E[x]^2`` cancellation), ``_gn_finalize`` merges
the chunks and writes ``scale`` and ``shift`` (``2 B Cin`` fp32). ``group_norm`` runs the same two
and one elementwise kernel, ``out = act(x scale + shift)``.

Traffic, in elements: ``x`` read once per column block (``ceil(Cout / BLOCK_N)`` times; the ``k k``
taps re-read neighbouring pixels from cache), the weight once per row block (from L2 after the first
of the row blocks that run together), the residual read and the output written once; ``2 M N K``
FLOPs. The GroupNorm adds one read of ``x``; ``group_norm`` reads ``x`` twice and writes once.

Tile sizes are fixed per shape class (no autotuning at run time, so a launch can be captured in a
CUDA graph): see :func:`plan`. On CPU (Triton's interpreter, for tests) tiles are small and
``conv2d`` refuses bfloat16: the interpreter stores it as uint16 and ``tl.dot`` multiplies the bit
patterns (triton-lang/triton#11584).
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl
from mmgen_engine.errors import BackendError
from mmgen_engine.kernels.linear import grouped_tile
from mmgen_engine.ops.conv import ACTIVATIONS

TARGET_PROGRAMS = 264  # a conv launch aims for two programs per SM of an H100 (132 SMs)
# (BLOCK_M, BLOCK_N, num_warps) on a GPU, largest first: the first that gives TARGET_PROGRAMS
# programs is taken, else the last. BLOCK_K and num_stages depend on the dtype: GPU_K_STAGES.
GPU_TILES = ((128, 128, 8), (128, 64, 4), (64, 64, 4))
GPU_K_STAGES = {torch.float32: (32, 2), torch.float16: (64, 3), torch.bfloat16: (64, 3)}
# the interpreter: small tiles, so that the tests' small shapes still span several of each
INTERPRETER_CONFIG = (64, 32, 32, 4, 1)
GROUP_M = 8
# GroupNorm: pixels per statistics program, and elements per tile (GPU, interpreter)
GN_CHUNK = {"cuda": 2048, "cpu": 32}
GN_TILE = {"cuda": 4096, "cpu": 256}
APPLY_TILE = 4096  # elements per program of group_norm's elementwise kernel


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == "relu":
        x = tl.maximum(x, 0.0)
    elif ACT == "silu":
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    batch, cin, hu, wu, cout, ho, wo, pad, out_scale,  # hu, wu: the (upsampled) input size
    sxb, sxc, sxh, sxw, swo, swi, swh, sww, srb, src, srh, srw, sob, soc, soh, sow,
    KSIZE: tl.constexpr, UPSAMPLE: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # row blocks are numbered image by image, in linear.py's grouped ordering
    tiles_per_image = tl.cdiv(ho * wo, BLOCK_M)
    pid_m, pid_n = grouped_tile(tl.program_id(0), batch * tiles_per_image, tl.cdiv(cout, BLOCK_N), GROUP_M)

    b = pid_m // tiles_per_image
    pix = (pid_m % tiles_per_image) * BLOCK_M + tl.arange(0, BLOCK_M)
    pix_ok = pix < ho * wo
    oh = pix // wo
    ow = pix % wo
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < cout
    x_base = x_ptr + b.to(tl.int64) * sxb  # 64-bit: a batch of large images passes 2^31 elements

    c_blocks = tl.cdiv(cin, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(0, KSIZE * KSIZE * c_blocks):  # (tap, channel block), channels fastest
        tap = step // c_blocks
        ci = (step - tap * c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        ci_ok = ci < cin
        kh = tap // KSIZE
        kw = tap % KSIZE
        ih = oh + kh - pad  # in up(x) coordinates
        iw = ow + kw - pad
        mask = (pix_ok & (ih >= 0) & (ih < hu) & (iw >= 0) & (iw < wu))[:, None] & ci_ok[None, :]
        if UPSAMPLE:
            ih = ih // 2
            iw = iw // 2
        a = tl.load(x_base + ih[:, None] * sxh + iw[:, None] * sxw + ci[None, :] * sxc, mask=mask, other=0.0)
        if NORM:
            sc = tl.load(scale_ptr + b * cin + ci, mask=ci_ok, other=0.0)
            sh = tl.load(shift_ptr + b * cin + ci, mask=ci_ok, other=0.0)
            # zero padding comes after the norm (and the activation, which keeps 0 at 0)
            a = tl.where(mask, a.to(tl.float32) * sc[None, :] + sh[None, :], 0.0)
        if ACT is not None:
            a = _activate(a.to(tl.float32), ACT)
        w = tl.load(w_ptr + cols[None, :] * swo + ci[:, None] * swi + kh * swh + kw * sww,
                    mask=ci_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc * out_scale
    out_mask = pix_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + b.to(tl.int64) * srb + oh[:, None] * srh + ow[:, None] * srw + cols[None, :] * src,
                      mask=out_mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(out_ptr + b.to(tl.int64) * sob + oh[:, None] * soh + ow[:, None] * sow + cols[None, :] * soc,
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gn_stats(x_ptr, part_ptr, groups, hw, group_size, chunk, sxb, sxp,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # program (image * groups + group, chunk): mean and sum of squared deviations of the chunk's
    # pixels x the group's channels, kept per channel and merged tile by tile (Chan et al.)
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = bg // groups
    ch = (bg % groups) * group_size + tl.arange(0, BLOCK_C)
    c_ok = tl.arange(0, BLOCK_C) < group_size
    start = split * chunk
    end = tl.minimum(start + chunk, hw)
    base = x_ptr + b.to(tl.int64) * sxb
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < end)[:, None] & c_ok[None, :]
        v = tl.load(base + p[:, None] * sxp + ch[None, :], mask=mask, other=0.0).to(tl.float32)
        seen = (p0 - start).to(tl.float32)
        count = tl.minimum(end - p0, BLOCK_P).to(tl.float32)
        tile_mean = tl.sum(v, axis=0) / count
        dev = tl.where(mask, v - tile_mean[None, :], 0.0)
        delta = tile_mean - mean
        mean += delta * (count / (seen + count))
        m2 += tl.sum(dev * dev, axis=0) + delta * delta * (seen * count / (seen + count))
    # the channels saw the same number of pixels: the group's mean is the mean of theirs
    group_mean = tl.sum(tl.where(c_ok, mean, 0.0), axis=0) / group_size
    spread = tl.where(c_ok, mean - group_mean, 0.0)
    group_m2 = tl.sum(tl.where(c_ok, m2, 0.0), axis=0) + (end - start).to(tl.float32) * tl.sum(spread * spread, axis=0)
    tl.store(part_ptr + (bg * tl.num_programs(1) + split) * 2, group_mean)
    tl.store(part_ptr + (bg * tl.num_programs(1) + split) * 2 + 1, group_m2)


@triton.jit
def _gn_finalize(part_ptr, gamma_ptr, beta_ptr, scale_ptr, shift_ptr, groups, channels, hw, group_size,
                 chunk, splits, eps, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    # program (image * groups + group): merge the chunks' statistics, write scale and shift
    bg = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < splits
    pixels = tl.where(s_ok, tl.minimum(hw - s * chunk, chunk), 0).to(tl.float32)
    means = tl.load(part_ptr + (bg * splits + s) * 2, mask=s_ok, other=0.0)
    m2s = tl.load(part_ptr + (bg * splits + s) * 2 + 1, mask=s_ok, other=0.0)
    mean = tl.sum(pixels * means, axis=0) / hw
    spread = tl.where(s_ok, means - mean, 0.0)
    var = (tl.sum(m2s, axis=0) + group_size * tl.sum(pixels * spread * spread, axis=0)) / (hw * group_size)
    rstd = 1.0 / tl.sqrt(var + eps)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < group_size
    ch = (bg % groups) * group_size + c
    scale = tl.load(gamma_ptr + ch, mask=c_ok, other=0.0).to(tl.float32) * rstd
    shift = tl.load(beta_ptr + ch, mask=c_ok, other=0.0).to(tl.float32) - mean * scale
    b = bg // groups
    tl.store(scale_ptr + b * channels + ch, scale, mask=c_ok)
    tl.store(shift_ptr + b * channels + ch, shift, mask=c_ok)


@triton.jit
def _gn_apply(x_ptr, scale_ptr, shift_ptr, out_ptr, hw, channels, sxb, sxp, sob, sop,
              ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # program (pixel block, channel block, image): out = act(x * scale + shift)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    c_ok = c < channels
    mask = (p < hw)[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + b.to(tl.int64) * sxb + p[:, None] * sxp + c[None, :], mask=mask, other=0.0)
    sc = tl.load(scale_ptr + b * channels + c, mask=c_ok, other=0.0)
    sh = tl.load(shift_ptr + b * channels + c, mask=c_ok, other=0.0)
    y = _activate(x.to(tl.float32) * sc[None, :] + sh[None, :], ACT)
    tl.store(out_ptr + b.to(tl.int64) * sob + p[:, None] * sop + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """A channels-last ``[B, C, H, W]`` as ``[B, H W, C]`` (a view)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _norm_scale_shift(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of channels-last ``x`` as ``x * scale + shift``: ``scale, shift [B, C]`` fp32."""
    b, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"group_norm: {c} channels are not divisible into {groups} groups")
    for name, t in (("weight", gamma), ("bias", beta)):
        if t.shape != (c,) or t.device != x.device or not t.is_floating_point():
            raise ValueError(f"group_norm: {name} must be a float [{c}] tensor on {x.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    xp = _pixels(x)
    group_size, hw = c // groups, h * w
    device = "cuda" if x.is_cuda else "cpu"
    chunk = GN_CHUNK[device]
    splits = triton.cdiv(hw, chunk)
    block_c = triton.next_power_of_2(group_size)
    block_p = min(chunk, max(1, GN_TILE[device] // block_c))
    part = torch.empty((b * groups, splits, 2), dtype=torch.float32, device=x.device)
    _gn_stats[(b * groups, splits)](xp, part, groups, hw, group_size, chunk, xp.stride(0), xp.stride(1),
                                    BLOCK_P=block_p, BLOCK_C=block_c)
    scale_shift = torch.empty((2, b, c), dtype=torch.float32, device=x.device)
    _gn_finalize[(b * groups,)](part, gamma.contiguous(), beta.contiguous(), scale_shift[0], scale_shift[1],
                                groups, c, hw, group_size, chunk, splits, eps,
                                BLOCK_S=triton.next_power_of_2(splits), BLOCK_C=block_c)
    return scale_shift[0], scale_shift[1]


def _check_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: expected a float32, float16 or bfloat16 input, got {x.dtype}")


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
               act: str | None = None) -> torch.Tensor:
    """``act(GroupNorm(groups)(x) * weight + bias)`` for ``x [B, C, H, W]`` -> channels-last, x's dtype."""
    _check_dtype("group_norm", x)
    if x.dim() != 4 or act not in ACTIVATIONS:
        raise ValueError(f"group_norm: expected x [B, C, H, W] and act in {ACTIVATIONS}, "
                         f"got {tuple(x.shape)} and {act!r}")
    x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = _norm_scale_shift(x, weight, bias, groups, eps)
    b, c, h, w = x.shape
    xp = _pixels(x)
    out = torch.empty((b, h * w, c), dtype=x.dtype, device=x.device)
    block_c = min(triton.next_power_of_2(c), 128)
    block_p = APPLY_TILE // block_c
    _gn_apply[(triton.cdiv(h * w, block_p), triton.cdiv(c, block_c), b)](
        xp, scale, shift, out, h * w, c, xp.stride(0), xp.stride(1), out.stride(0), out.stride(1),
        ACT=act, BLOCK_P=block_p, BLOCK_C=block_c)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


def plan(batch: int, pixels: int, cin: int, cout: int, dtype: torch.dtype,
         on_gpu: bool) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` for ``batch`` images of ``pixels``
    output pixels. On a GPU the largest tile of :data:`GPU_TILES` that still launches
    :data:`TARGET_PROGRAMS` programs; ``BLOCK_K`` no wider than ``Cin`` needs (at least 16, for
    ``tl.dot``)."""
    if not on_gpu:
        block_m, block_n, block_k, warps, stages = INTERPRETER_CONFIG
    else:
        block_k, stages = GPU_K_STAGES[dtype]
        for block_m, block_n, warps in GPU_TILES:
            if batch * triton.cdiv(pixels, block_m) * triton.cdiv(cout, block_n) >= TARGET_PROGRAMS:
                break
    return block_m, block_n, min(block_k, max(16, triton.next_power_of_2(cin))), warps, stages


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
           upsample: bool = False, norm: tuple | None = None, act: str | None = None,
           residual: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """``residual + scale * (conv2d(act(norm(up(x))), weight, padding) + bias)`` (module docstring).

    ``x [B, Cin, H, W]``, ``weight [Cout, Cin, k, k]``, ``bias [Cout]``, ``norm = (gamma [Cin],
    beta [Cin], groups, eps)``, ``residual [B, Cout, H', W']`` -> channels-last ``[B, Cout, H', W']``
    with ``H' = (2 if upsample else 1) H + 2 padding - k + 1``.
    """
    _check_dtype("conv2d", x)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        raise BackendError("conv2d: Triton's interpreter cannot run tl.dot on bfloat16; use float32 or "
                           "float16 on CPU")
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1] or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"conv2d: expected x [B, Cin, H, W] and weight [Cout, Cin, k, k], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"conv2d: act must be one of {ACTIVATIONS}, got {act!r}")
    b, cin, h, w = x.shape
    cout, k = weight.shape[0], weight.shape[2]
    hu, wu = (2 * h, 2 * w) if upsample else (h, w)
    ho, wo = hu + 2 * padding - k + 1, wu + 2 * padding - k + 1
    if padding < 0 or ho < 1 or wo < 1:
        raise ValueError(f"conv2d: a {k}x{k} kernel with padding {padding} does not fit a {hu}x{wu} input")
    for name, t, shape in (("weight", weight, weight.shape), ("bias", bias, (cout,)),
                           ("residual", residual, (b, cout, ho, wo))):
        if t is not None and (t.shape != shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"conv2d: {name} must be {x.dtype} {tuple(shape)} on {x.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")

    x = x.contiguous(memory_format=torch.channels_last)
    if norm is not None:
        norm_scale, norm_shift = _norm_scale_shift(x, *norm)
    else:
        norm_scale = norm_shift = None
    out = torch.empty((b, cout, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    block_m, block_n, block_k, warps, stages = plan(b, ho * wo, cin, cout, x.dtype, x.is_cuda)
    grid = (b * triton.cdiv(ho * wo, block_m) * triton.cdiv(cout, block_n),)
    _conv_kernel[grid](
        x, weight, None if bias is None else bias.contiguous(), norm_scale, norm_shift, residual, out,
        b, cin, hu, wu, cout, ho, wo, padding, float(scale),
        *x.stride(), *weight.stride(), *(residual.stride() if residual is not None else (0, 0, 0, 0)),
        *out.stride(),
        KSIZE=k, UPSAMPLE=upsample, NORM=norm is not None, ACT=act,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        num_warps=warps, num_stages=stages,
    )
    return out
