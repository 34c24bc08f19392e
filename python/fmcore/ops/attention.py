"""Flash attention: exact softmax attention without an S x S matrix, forward and backward.

``flash_attention(q, k, v)`` takes q (B, Sq, Hq, D) and k/v (B, Sk, Hk, D), the layout a fused qkv
projection produces; any strides work as long as the last dim is contiguous, so q, k, v sliced out of
one projection need no copy. ``flash_attention_varlen`` takes packed documents (T, H, D) with int32
cumulative lengths, the document-masked attention of packed batches; ``flash_attention_qkvpacked``
either, on one (B, S, 3, H, D) or (T, 3, H, D) qkv tensor. ``scaled_dot_product_attention``
is a drop-in for torch's (B, H, S, D) function that uses fmcore's kernel where it applies.

Conventions (FlashAttention 2.1+):
- GQA/MQA: Hk must divide Hq; query head h reads kv head h // (Hq // Hk).
- causal=True aligns the mask to the bottom-right corner: query i sees keys j <= i + Sk - Sq. When
  Sq > Sk the first Sq - Sk queries see no key: their output is 0 and their lse is -inf (the log of an
  empty sum; FlashAttention stores +inf internally, we return the mathematical value), and their
  gradients are 0.
- window_size=(left, right) (FlashAttention-2's sliding window, local attention): query i sits at key
  position p = i + Sk - Sq (the causal diagonal) and sees keys j with p - left <= j <= p + right; -1
  leaves that side unbounded, so (-1, -1) is full attention and (-1, 0) causal. causal=True means
  right = 0: it combines with (left, -1) or (left, 0); a right bound > 0 with causal=True is an
  error. Rows whose window holds no key are as the causal rows above (out 0, lse -inf, gradients 0).
  Key blocks wholly outside every window of a block of queries are skipped, forward and backward,
  on CUDA (windowed calls run tile configuration 0's kernels, whatever ``tiles`` asks) and on the
  CPU (whose windowed calls take the chunked reference).
- lse is the natural-log log-sum-exp of the scaled scores, float32 (float64 for float64 CPU inputs),
  (B, Hq, Sq) batched, (Hq, T) varlen. Gradients flow through lse too.
- Non-finite scores. A key every query scores -inf is as a hidden one: out, lse, dk and dv finite,
  as torch's; but dq of a row that sees a key holding +-inf is NaN (dS K has 0 * inf there, in
  torch too), and the kernels' tiles (the CPU's row chunks) carry that NaN to the other rows of
  the tile, rows that see no key included (where the dense float64 reference is NaN too). A +inf
  or NaN score (or a NaN scale) makes its row's out and lse NaN, and the gradients that row
  reaches (the float64 reference's lse is +inf for +inf). Scores are formed unscaled in fp32 and
  the scale applied in the exponent, as FlashAttention does: a |q . k| past 3.4e38 (elements near
  bf16's largest) overflows to +-inf, where torch's math backend, which scales q and k first,
  stays finite.

Devices: CUDA kernels for bf16/fp16 and head dims 64, 96, 128 (other head dims or dtypes raise a
ValueError naming them; ``scaled_dot_product_attention`` falls back to torch instead); on the CPU
any head dim and fp32/fp64/bf16/fp16 with fp32 (fp64) accumulation: torch's own fused CPU flash
kernel for fp32/fp64 batched calls whose causal mask it shares (Sq == Sk, or not causal), and
fmcore's chunked reference for the rest (csrc/ops/attention.cpp). torch's kernel gives a query row
that holds NaN the output 0 (pytorch#141128, fp32/fp64 only), where the reference gives NaN.

Backward on CUDA, as FlashAttention-2 does it: by default the kernel that owns a block of keys also
adds its share of dq into an fp32 buffer with atomics (5 matmuls of the block size), so dq's float
additions happen in an order that varies run to run. ``deterministic=True`` computes dq in a second
pass that owns its rows instead (no atomics, bitwise reproducible run to run), at the price of
recomputing QK^T and dO V^T (7 matmuls, about 1.4x the tensor-core work). dk and dv never use
atomics. Like torch's own attention backends, ``torch.use_deterministic_algorithms(True)`` (strict,
not warn_only) also selects the deterministic backward. Both CPU paths are always deterministic.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fmcore.ops._common import (autocast_dtype, dense_last_dim, expect_tensors, first_order_only, func_transformable,
                                grad_transform_active, refuse_tangents, register_fake)

CUDA_HEAD_DIMS = (64, 96, 128)
CUDA_DTYPES = (torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    if isinstance(softmax_scale, torch.Tensor):
        # float() would detach it: a learned temperature would silently get no gradient (torch's SDPA
        # refuses a tensor scale too).
        raise TypeError(f"expected softmax_scale to be a float, got a Tensor (requires_grad="
                        f"{softmax_scale.requires_grad}): fmcore's attention has no gradient for the scale; "
                        "scale q instead, or pass float(scale)")
    if softmax_scale is not None:
        return float(softmax_scale)
    # A head dim of 0 (or a 0-d q) reaches the binding, which raises a ValueError naming q, instead of
    # failing here with a ZeroDivisionError.
    d = q.shape[-1] if q.dim() > 0 else 0
    return 1.0 / math.sqrt(d) if d > 0 else 1.0


# Dynamo cannot trace the warn_only query: under torch.compile the mode is read once, when the graph is
# traced (set it before compiling).
@torch.compiler.assume_constant_result
def _strict_deterministic_mode() -> bool:
    return torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


def _window(window_size, causal: bool) -> tuple[int, int]:
    """window_size checked: a pair of ints >= -1, whose right bound is -1 or 0 with causal=True. The op
    checks the values too (naming window_left / window_right); this names the argument users pass."""
    ok = (isinstance(window_size, (tuple, list)) and len(window_size) == 2
          and all(isinstance(w, (int, torch.SymInt)) and not isinstance(w, bool) for w in window_size))
    if not ok:
        raise ValueError(f"expected window_size to be a pair of ints (left, right), -1 for no bound on that side, "
                         f"got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"expected window_size values >= -1 (-1: no bound on that side), got {tuple(window_size)}")
    if causal and right > 0:
        raise ValueError(f"expected window_size[1] of -1 or 0 with causal=True (causal is a right bound of 0), got "
                         f"window_size={tuple(window_size)}; pass causal=False for a right bound > 0")
    return left, right


def _deterministic(flag: bool) -> bool:
    """The caller's flag, or torch's strict deterministic mode (warn_only mode keeps the fast path, as
    torch's memory-efficient attention backward does)."""
    return bool(flag) or _strict_deterministic_mode()


class _TilesBlock:
    """One open attention_tiles block (compared by identity)."""

    __slots__ = ("tiles",)

    def __init__(self, tiles: int):
        self.tiles = tiles


# The open attention_tiles blocks, oldest first; tiles=0 runs the newest one's tiles. Process-wide, as
# sdpa_kernel's backends. Each block removes its own entry on exit: a block restoring the value it
# found on entry, as before, left tiles set for good when two threads' blocks overlapped (A enters,
# B enters, A exits, B exits: B restored A's value). (The backward reads the tiles its forward saved.)
_tiles_blocks: list[_TilesBlock] = []


@contextlib.contextmanager
def attention_tiles(tiles: int) -> Iterator[None]:
    """Within the block, flash attention calls that leave ``tiles`` at 0 run tile configuration
    ``tiles`` (see ``flash_attention``). It reaches attention called by code you do not edit, such
    as a model's layers, as ``torch.nn.attention.sdpa_kernel`` does for SDPA's backends: for A/B
    runs of the CUDA kernels (the training benchmark's fmcore-tiles systems). Under torch.compile
    the value is read when the graph is traced."""
    from fmcore import _C

    if isinstance(tiles, bool) or not isinstance(tiles, int) or not 0 <= tiles < _C.attention_tile_configs:
        raise ValueError(f"expected tiles in [0, {_C.attention_tile_configs - 1}], got {tiles!r}")
    block = _TilesBlock(tiles)
    _tiles_blocks.append(block)
    try:
        yield
    finally:
        _tiles_blocks.remove(block)  # identity: this block's entry, wherever other threads' are


def _tiles(tiles: int) -> int:
    if isinstance(tiles, bool) or not isinstance(tiles, (int, torch.SymInt)):
        # int() read 2.5 as 2, True as 1 and "3" as 3: a configuration the caller did not name
        # (attention_tiles refuses these too). The op checks the range.
        from fmcore import _C

        raise ValueError(f"expected tiles in [0, {_C.attention_tile_configs - 1}], got {tiles!r}")
    return tiles or (_tiles_blocks[-1].tiles if _tiles_blocks else 0)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    tiles: int = 0,
    window_size: tuple[int, int] = (-1, -1),
):
    """softmax(q k^T * softmax_scale [+ causal / window mask]) v for q (B, Sq, Hq, D), k/v (B, Sk, Hk, D).

    Args:
        causal: mask aligned to the bottom-right corner (see the module docstring).
        window_size: (left, right), FlashAttention-2's sliding window: query i sees keys j with
            i + Sk - Sq - left <= j <= i + Sk - Sq + right, -1 for no bound on that side (see the
            module docstring). (-1, -1), the default, is no window; with causal=True, right must be
            -1 or 0.
        softmax_scale: defaults to 1/sqrt(D).
        deterministic: a bitwise reproducible backward on CUDA (no atomic dq; about 1.4x the
            backward's tensor-core work). Default False, as in FlashAttention.
        return_lse: also return lse (B, Hq, Sq) float32.
        tiles: the CUDA kernels' tile configuration: 0, the default (or what ``attention_tiles``
            sets), or 1 to 6, the alternatives that ``python -m fmcore.bench attention`` times beside
            it (csrc/kernels/attention.cu's Tiles; 3 to 6 run the forward and dk/dv on Hopper's
            wgmma where sm_90a code is compiled in: 4 with one-warpgroup dk/dv blocks, two an SM;
            5 with the softmax overlapping the P V matmul; 6 both, its forward one warpgroup a
            block too).
            The same results up to the order of floating-point sums; ignored on the CPU, and by
            windowed calls, which run configuration 0's windowed kernels.
    Returns:
        out (B, Sq, Hq, D) in q's dtype, contiguous; (out, lse) when return_lse.
    """
    expect_tensors(q=q, k=k, v=v)
    refuse_tangents("flash_attention", q, k, v)
    left, right = _window(window_size, bool(causal))
    out, lse = _flash_attn_fwd(q, k, v, None, None, 0, 0, bool(causal), _scale(q, softmax_scale),
                               _deterministic(deterministic), _tiles(tiles), left, right)
    return (out, lse) if return_lse else out


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    tiles: int = 0,
    window_size: tuple[int, int] = (-1, -1),
):
    """Attention within each packed document: q (Tq, Hq, D), k/v (Tk, Hk, D).

    Args:
        cu_seqlens_q, cu_seqlens_k: int32 (N + 1,) cumulative lengths on q's device: document b is
            rows [cu[b], cu[b+1]); cu[0] == 0, non-decreasing, cu[-1] == rows of q (k).
        max_seqlen_q, max_seqlen_k: at least the longest document (they size the CUDA grid).
        causal, softmax_scale, deterministic, tiles, window_size: as in ``flash_attention``; causal
            and the window are aligned to the bottom-right corner of each document.
        return_lse: also return lse (Hq, Tq) float32.
    On CUDA the values of cu_seqlens are checked with one small device-to-host copy, skipped when the
    same unmodified tensor was checked last (every layer of a model passes the same one; not for a
    cu_seqlens made under torch.inference_mode, which keeps no version counter), under
    torch.compile and during CUDA graph capture (which forbids the copy). The kernels clamp every
    entry, so a bad cu_seqlens can never touch memory out of bounds; the check is there to turn a
    wrong result into an error.
    """
    expect_tensors(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    refuse_tangents("flash_attention_varlen", q, k, v)
    left, right = _window(window_size, bool(causal))
    max_seqlen_q, max_seqlen_k = _max_seqlen(max_seqlen_q, "max_seqlen_q"), _max_seqlen(max_seqlen_k, "max_seqlen_k")
    if q.is_cuda and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
        _check_cu_values(cu_seqlens_q, q, max_seqlen_q, "cu_seqlens_q", "max_seqlen_q", "q")
        _check_cu_values(cu_seqlens_k, k, max_seqlen_k, "cu_seqlens_k", "max_seqlen_k", "k")
    out, lse = _flash_attn_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal), _scale(q, softmax_scale),
        _deterministic(deterministic), _tiles(tiles), left, right,
    )
    return (out, lse) if return_lse else out


def flash_attention_qkvpacked(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    tiles: int = 0,
    window_size: tuple[int, int] = (-1, -1),
):
    """``flash_attention`` (``flash_attention_varlen`` with cu_seqlens) for q, k and v packed in one
    tensor, as a fused qkv projection makes them: qkv (B, S, 3, H, D), or (T, 3, H, D) with
    cu_seqlens (int32 (N + 1,), for queries and keys alike) and max_seqlen.

    The same results as unpacking qkv along dim -3 and calling those, forward and backward; but the
    backward writes dq, dk and dv into one gradient of qkv's shape, where unpacking would make
    autograd stack three gradients into it: a copy of three times the attention inputs, read and
    written, every layer (FlashAttention's qkvpacked functions avoid it the same way). Keyword
    arguments (window_size included) as in ``flash_attention``. Returns out (B, S, H, D) ((T, H, D)), and lse when
    return_lse.
    """
    varlen = cu_seqlens is not None
    expect_tensors(qkv=qkv, **({"cu_seqlens": cu_seqlens} if varlen else {}))
    left, right = _window(window_size, bool(causal))
    if qkv.dim() != (4 if varlen else 5) or qkv.shape[-3] != 3:
        want = "(total, 3, H, D) (with cu_seqlens)" if varlen else "(B, S, 3, H, D)"
        got = tuple(qkv.shape)
        raise ValueError(f"expected qkv of shape {want}, got {got}")
    if varlen:
        if max_seqlen is None:
            raise ValueError("expected max_seqlen (the longest sequence) with cu_seqlens, got None")
        max_seqlen = _max_seqlen(max_seqlen, "max_seqlen")
        if qkv.is_cuda and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
            _check_cu_values(cu_seqlens, qkv.select(-3, 0), max_seqlen, "cu_seqlens", "max_seqlen", "qkv")
    else:
        max_seqlen = 0
    out, lse = _FlashAttentionQKVPacked.apply(qkv, cu_seqlens, max_seqlen, bool(causal),
                                              _scale(qkv, softmax_scale), _deterministic(deterministic), _tiles(tiles),
                                              left, right)
    return (out, lse) if return_lse else out


class _FlashAttentionQKVPacked(torch.autograd.Function):
    """flash_attn_fwd on qkv's three views; the backward, flash_attn_qkvpacked_bwd, returns qkv's
    gradient whole."""

    # torch.func.vmap batches the ops inside, as it does for flash_attention's (without it vmap raised).
    generate_vmap_rule = True

    @staticmethod
    def forward(qkv, cu_seqlens, max_seqlen, causal, scale, deterministic, tiles, window_left, window_right):
        q, k, v = qkv.unbind(-3)
        return torch.ops.fmcore.flash_attn_fwd(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal,
                                               scale, deterministic, tiles, window_left, window_right)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, cu_seqlens, max_seqlen, causal, scale, deterministic, tiles, window_left, window_right = inputs
        ctx.save_for_backward(qkv, *output, cu_seqlens)
        ctx.args = (max_seqlen, causal, scale, deterministic, tiles, window_left, window_right)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dout, dlse):
        qkv, out, lse, cu_seqlens = ctx.saved_tensors

        def grads():
            d_out, d_lse = _kernel_grads(out, dout, dlse)
            return (torch.ops.fmcore.flash_attn_qkvpacked_bwd(d_out, qkv, out, lse, d_lse, cu_seqlens, *ctx.args),)

        (dqkv,) = first_order_only("flash_attention", grads, dout, dlse, qkv)
        return dqkv, None, None, None, None, None, None, None, None


# name -> (weakref to the last cu_seqlens tensor found valid, its version, (rows, max_seqlen))
_cu_checked: dict[str, tuple] = {}


def _max_seqlen(value, name: str) -> int | torch.SymInt:
    """An int: a None or a fractional float (4.7 would be truncated, sizing the grid too small) is a
    TypeError naming the argument; ints and integral values pass, and SymInts as they are (the ops
    take SymInt: under torch.compile a max_seqlen that changes every batch stays symbolic rather
    than compiling a graph per value)."""
    if isinstance(value, torch.SymInt):
        return value
    if value is None or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError(f"expected {name} to be an int (at least the longest document), got {value!r}")
    return int(value)


def _check_cu_values(cu, x, max_seqlen, name, max_name, x_name) -> None:
    """The value checks the CPU binding does in C++, for CUDA tensors (messages match)."""
    if (not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1
            or x.dim() != 3):
        return  # the binding raises for these, naming the argument
    key = (x.shape[0], max_seqlen)
    # An inference tensor (made under torch.inference_mode) has no version counter (reading _version
    # raises) and can change in place unseen: it is checked every call, never cached.
    version = None if cu.is_inference() else cu._version
    hit = _cu_checked.get(name)
    if version is not None and hit is not None and hit[0]() is cu and hit[1] == version and hit[2] == key:
        return
    c = cu.cpu().tolist()
    if c[0] != 0:
        raise ValueError(f"expected {name} to start at 0, got {c[0]}")
    for i in range(1, len(c)):
        if c[i] < c[i - 1]:
            raise ValueError(f"expected {name} to be non-decreasing, got {c[i - 1]} then {c[i]} at index {i}")
        if c[i] - c[i - 1] > max_seqlen:
            raise ValueError(f"expected {max_name} ({max_seqlen}) >= every sequence length in {name}, "
                             f"got a sequence of {c[i] - c[i - 1]} at index {i - 1}")
    if c[-1] != x.shape[0]:
        raise ValueError(f"expected the last entry of {name} ({c[-1]}) to equal the number of rows of "
                         f"{x_name} ({x.shape[0]})")
    if version is not None:
        _cu_checked[name] = (weakref.ref(cu), version, key)


# ---- torch.library registrations: fake (meta) impls and autograd


@register_fake("flash_attn_fwd")
def _flash_attn_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                         deterministic=False, tiles=0, window_left=-1, window_right=-1):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=lse_dtype)


@register_fake("flash_attn_bwd")
def _flash_attn_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         causal, softmax_scale, deterministic=False, tiles=0, window_left=-1, window_right=-1):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@register_fake("flash_attn_qkvpacked_bwd")
def _flash_attn_qkvpacked_bwd_fake(dout, qkv, out, lse, dlse, cu_seqlens, max_seqlen, causal, softmax_scale,
                                   deterministic=False, tiles=0, window_left=-1, window_right=-1):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    # defaults arrive filled in
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, deterministic, tiles, window_left, window_right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale, deterministic, tiles, window_left, window_right)
    # An unused lse then reaches the backward as None, not as zeros that autograd allocates and the
    # kernels read (and on the CPU, a dlse sends the backward to the reference instead of torch's kernel).
    ctx.set_materialize_grads(False)


def _kernel_grads(out, dout, dlse):
    """The output gradients as the backward kernels take them. Empty or missing ones arrive as None or
    stride-0 expansions: dout becomes a dense zero tensor, dlse stays None."""
    dout = torch.zeros_like(out) if dout is None or dout.numel() == 0 else dense_last_dim(dout)
    return dout, None if dlse is None else dlse.contiguous()


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors

    def grads():
        d_out, d_lse = _kernel_grads(out, dout, dlse)
        return torch.ops.fmcore.flash_attn_bwd(d_out, q, k, v, out, lse, d_lse, cu_q, cu_k, *ctx.args)

    dq, dk, dv = first_order_only("flash_attention", grads, dout, dlse, q, k, v)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fmcore::flash_attn_fwd", _backward, setup_context=_setup_context)
_flash_attn_fwd_func = func_transformable(torch.ops.fmcore.flash_attn_fwd, _setup_context, _backward)


def _flash_attn_fwd(*args):
    """fmcore::flash_attn_fwd, in the form torch.func's gradient transforms accept under them."""
    return (_flash_attn_fwd_func if grad_transform_active() else torch.ops.fmcore.flash_attn_fwd)(*args)


# ---- torch.nn.functional.scaled_dot_product_attention drop-in

_warned: set[str] = set()
# torch's own function, not the F.scaled_dot_product_attention attribute looked up at call time: code
# that adopts the drop-in by assigning it to torch.nn.functional.scaled_dot_product_attention (so that
# models it does not edit, such as Hugging Face's, call it) would otherwise have every fallback call
# the drop-in again, until RecursionError.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fmcore.ops.scaled_dot_product_attention: falling back to torch's SDPA ({reason}); "
                      "this warning is shown once per reason", stacklevel=3)


def _sdpa_fallback_reason(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa) -> str | None:
    """Why fmcore's kernel cannot compute torch's result for these arguments, or None when it can."""
    if attn_mask is not None:
        return "attn_mask is not supported"
    if dropout_p > 0.0:
        return "dropout_p > 0 is not supported"
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "inputs are not 4-D (B, H, S, D)"
    if not (q.device == k.device == v.device) or not (q.dtype == k.dtype == v.dtype):
        return "q, k, v differ in device or dtype"
    if q.is_cuda:
        if q.dtype not in CUDA_DTYPES:
            return f"dtype {q.dtype} on CUDA (fmcore's kernel takes bfloat16 and float16)"
        if q.shape[-1] not in CUDA_HEAD_DIMS:
            return f"head dim {q.shape[-1]} on CUDA (fmcore's kernel takes {CUDA_HEAD_DIMS})"
        if max(q.shape[0], q.shape[1], k.shape[1]) > 65535:
            return "more than 65535 sequences or heads on CUDA (the kernel's grid limit)"
    elif q.device.type != "cpu" or q.dtype not in CPU_DTYPES:
        return f"device {q.device} / dtype {q.dtype}"
    if k.shape != v.shape or k.shape[-1] != q.shape[-1] or k.shape[0] != q.shape[0]:
        return "q, k, v shapes differ beyond the sequence and head dims"
    if q.shape[1] != k.shape[1] and not (enable_gqa and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0):
        return "query and key head counts differ without enable_gqa"
    # Lengths whose equality is unknown (torch.export with separate Dims for the query and key lengths)
    # take torch's SDPA, right at every length, rather than a guard Sq == Sk that export refuses.
    if is_causal and not statically_known_true(q.shape[2] == k.shape[2]):
        return "is_causal with Sq != Sk (torch aligns that mask top-left, fmcore bottom-right)"
    if any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in (q, k, v)):
        return "the head dim is not contiguous"
    return None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on (B, H, S, D) tensors.

    fmcore's kernel runs when it computes exactly torch's result; otherwise (attn_mask, dropout,
    unsupported dtype or head dim, causal with Sq != Sk, ...) torch's SDPA runs, with a one-time
    warning naming the reason. The result is a (B, H, Sq, D) view of a (B, Sq, H, D) buffer.
    """
    if isinstance(scale, torch.Tensor):
        # As torch's: a 0-d tensor that does not require grad is read as a float (a scale kept in a
        # buffer); float() would detach a learned scale silently, so that one is refused.
        if scale.requires_grad or scale.dim() != 0:
            raise TypeError(f"expected scale to be a float (or a 0-d tensor that does not require grad), got a "
                            f"Tensor of shape {tuple(scale.shape)} with requires_grad={scale.requires_grad}")
        scale = float(scale)
    # Autocast runs torch's SDPA in its dtype; fmcore's op has no autocast rule of its own. (A loop,
    # not a generator binding a name with :=, which makes it a closure cell that torch 2.11's strict
    # torch.export cannot read.)
    dtypes = [autocast_dtype(t) for t in (query, key, value)]
    query, key, value = [t if d is None else t.to(d) for t, d in zip((query, key, value), dtypes)]
    reason = _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if reason is not None:
        if not torch.compiler.is_compiling():
            _warn_once(reason)
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if query.shape[1] == 0 or query.shape[-1] == 0:
        return _empty_attention(query, key, value)
    out = flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=is_causal,
                          softmax_scale=scale)
    return out.transpose(1, 2)


def _empty_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's (empty) result for no query heads or a head dim of 0, where fmcore's kernel raises and
    torch 2.11's CPU kernel divides by the head count (SIGFPE). Products of the inputs: the result is
    in their autograd graph, as torch's."""
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1
    k, v = (t.repeat_interleave(group, 1)[:, :q.shape[1]] for t in (k, v))
    return q @ k.transpose(-2, -1) @ v
