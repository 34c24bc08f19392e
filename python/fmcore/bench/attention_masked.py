"""Masked attention benchmark: the masks LLM training uses, fmcore against each peer that runs them,
forward and backward.

Cases (bf16 on the GPU):
- sliding window, Mistral's: causal attention where query i sees keys i - left .. i (FlashAttention-2's
  window_size=(left, 0): left + 1 keys, itself included); B2 H16 S8192 D128, left 4095, 1023 and 511.
- documents (packed sequences): 16384 tokens of documents, each attending causally within itself
  (cu_seqlens), H16 D128. Lengths (document_lengths): seed 0, log-uniform between 32 and 8192 tokens
  (round(exp(U(ln 32, ln 8192)))), drawn until they fill the total; the last one is cut to fit.

Systems:
- fmcore: flash_attention(causal=True, window_size=(left, 0)); flash_attention_varlen(causal=True).
- torch-flex: FlexAttention with the mask as a mask_mod, its block mask built once outside the timing;
  compiled (torch.compile) on CUDA, where the window cases share one compile (the window is a tensor
  the mask_mod reads). On the CPU it runs eager and forward only: torch has no CPU backward for it,
  and the CPU numbers prove the path, not the speed.
- torch-varlen (CUDA): torch.nn.attention.varlen.varlen_attn (torch's FA2 varlen kernel), with
  window_size=(left, 0); the window cases pass the B sequences as B documents of S tokens.
- flash-attn (CUDA, when the FA2 package is installed): flash_attn_func / flash_attn_varlen_func.
- sdpa-flash-full-causal (CUDA; torch-eager-full-causal on the CPU): SDPA causal over the whole
  sequence (the packed documents as one sequence) WITHOUT the window or document mask. Other, larger
  work: the reference point of what the mask saves. Compare its ms, not its TFLOP/s.

FLOPs: exactly the (query, key) pairs each system's mask admits, counted on the host (admitted_pairs):
forward 4 * D * pairs (over B and H), backward 2.5x the forward (FlashAttention's convention). So
TFLOP/s is one measure across the masked systems: key blocks a kernel computes and then masks earn it
nothing. The full-causal reference is credited its own S (S + 1) / 2 pairs a head (the attention
benchmark's S^2 / 2 differs by 1 / S). roofline% is against the bf16 matmul rate of the same run.

Quick (the CPU): small float32 shapes. Every masked system's output, and its gradients where it has
a backward, must agree with a float64 SDPA under the dense mask; one that does not raises Disagreement,
which measure_system never turns into a skipped peer. (--quick on the GPU runs them in bf16, unchecked.)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fmcore.bench import BenchContext, Disagreement, Row, measure_system, try_import
from fmcore.bench.timing import time_ms
from fmcore.ops import flash_attention, flash_attention_varlen

BENCH = "attention_masked"
# (B, H, S, D, left)
WINDOW_CASES = [(2, 16, 8192, 128, left) for left in (4095, 1023, 511)]
QUICK_WINDOW_CASES = [(1, 2, 256, 32, 63)]
# (total tokens, shortest, longest, H, D)
DOC_CASES = [(16384, 32, 8192, 16, 128)]
QUICK_DOC_CASES = [(384, 8, 192, 2, 32)]


@dataclass(frozen=True)
class MaskedCase:
    B: int
    H: int
    D: int
    lengths: tuple[int, ...]  # the documents of each of the B rows: one of S tokens, or packed ones
    left: int  # causal window: query i sees keys i - left .. i of its document; -1: every earlier key

    @property
    def S(self) -> int:
        return sum(self.lengths)

    def name(self, dtype: torch.dtype) -> str:
        dt = "bf16" if dtype == torch.bfloat16 else "fp32"
        if len(self.lengths) == 1:
            return f"B{self.B} H{self.H} S{self.S} D{self.D} causal window ({self.left}, 0) {dt}"
        return (f"T{self.S} H{self.H} D{self.D} causal docs ({len(self.lengths)} docs, "
                f"{min(self.lengths)}-{max(self.lengths)} tokens) {dt}")


@dataclass
class System:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (B, S, H, D) q, k, v -> out
    backward: bool = True
    masked: bool = True  # False: the full-causal reference (its own pairs, no agreement check)


def admitted_pairs(lengths, left: int) -> int:
    """(query, key) pairs of causal attention within each document of lengths, query i seeing keys
    i - left .. i (left -1: all of them). In a document of n tokens the first m = min(n, left + 1)
    queries see every earlier key and themselves, m (m + 1) / 2 pairs; each later one left + 1 keys."""
    total = 0
    for n in lengths:
        m = n if left < 0 else min(n, left + 1)
        total += m * (m + 1) // 2 + (n - m) * (left + 1)
    return total


def dense_mask(lengths, left: int) -> torch.Tensor:
    """The (S, S) boolean mask, True where a query (row) may see a key: the same document, not later,
    and within left keys before it (left -1: no bound)."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i = torch.arange(len(doc))[:, None]
    j = torch.arange(len(doc))[None, :]
    keep = (doc[:, None] == doc[None, :]) & (j <= i)
    return keep & (i - j <= left) if left >= 0 else keep


def document_lengths(total: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """Seeded document lengths, log-uniform between shortest and longest, filling total tokens (the
    last one cut to fit): as many short documents as long ones at each scale, as in pretraining data."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        u = torch.rand((), generator=gen).item()
        n = round(math.exp(math.log(shortest) + u * (math.log(longest) - math.log(shortest))))
        lengths.append(min(n, total - sum(lengths)))
    return lengths


def _cu_seqlens(case: MaskedCase, device) -> torch.Tensor:
    """int32 cumulative lengths of every document of the B rows, flattened to (B S, H, D)."""
    return torch.tensor([0, *case.lengths * case.B], device=device).cumsum(0).to(torch.int32)


def _flex_mask_mod(case: MaskedCase, device):
    """The case's mask for FlexAttention, reading tensors (the documents' ids, the window) rather than
    Python constants, so that compiled flex takes another window as an input, not a recompile."""
    if len(case.lengths) > 1:
        doc = torch.repeat_interleave(torch.arange(len(case.lengths), device=device),
                                      torch.tensor(case.lengths, device=device))
        return lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q)
    left = torch.tensor(case.left, device=device)
    return lambda b, h, q, kv: (kv <= q) & (q - kv <= left)


def _flex(case: MaskedCase, device, compiled):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Built on the first call, which _measure makes before the timing (and where a failure is the
    # peer's, reported by measure_system); the later calls reuse it.
    @functools.cache
    def block_mask():
        return create_block_mask(_flex_mask_mod(case, device), B=None, H=None, Q_LEN=case.S, KV_LEN=case.S,
                                 device=device)

    def eager(*args, **kwargs):  # on the CPU on purpose (the module docstring says why): no warning
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(*args, **kwargs)

    flex = compiled if device.type == "cuda" else eager

    def fn(q, k, v):  # flex takes (B, H, S, D): the transposed views, no copy
        return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask()).transpose(1, 2)

    return fn


def _systems(device: torch.device, case: MaskedCase, compiled_flex=None) -> list[System]:
    """Each system that runs the case here, fmcore first."""
    cu, longest = _cu_seqlens(case, device), max(case.lengths)
    window = (case.left, 0) if case.left >= 0 else (-1, -1)

    def varlen(attend):  # (B, S, H, D) through a varlen function on (B S, H, D) views
        return lambda q, k, v: attend(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)).view_as(q)

    if len(case.lengths) == 1:
        fmcore = System("fmcore", lambda q, k, v: flash_attention(q, k, v, causal=True, window_size=window))
    else:
        fmcore = System("fmcore", varlen(lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, longest, longest,
                                                                              causal=True)))
    systems = [fmcore]
    if device.type == "cuda":
        systems.append(System("torch-flex", _flex(case, device, compiled_flex)))
        torch_varlen = try_import("torch.nn.attention.varlen")
        if torch_varlen is not None and hasattr(torch_varlen, "varlen_attn"):
            # window_size=(-1, 0) is its causal
            systems.append(System("torch-varlen", varlen(lambda q, k, v: torch_varlen.varlen_attn(
                q, k, v, cu, cu, longest, longest, window_size=(case.left, 0)))))
        fa2 = try_import("flash_attn")
        if fa2 is not None:
            if len(case.lengths) == 1:
                fn = lambda q, k, v: fa2.flash_attn_func(q, k, v, causal=True, window_size=window)  # noqa: E731
            else:
                fn = varlen(lambda q, k, v: fa2.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True,
                                                                       window_size=window))
            systems.append(System("flash-attn", fn))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def full_causal(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True).transpose(1, 2)

        systems.append(System("sdpa-flash-full-causal", full_causal, masked=False))
    else:
        systems.append(System("torch-flex", _flex(case, device, None), backward=False))
        systems.append(System("torch-eager-full-causal", lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2), masked=False))
    return systems


def _reference(case: MaskedCase, q, k, v, dout) -> list[torch.Tensor]:
    """float64 out, dq, dk and dv of SDPA under the case's dense mask (the quick runs' check)."""
    q64, k64, v64 = (t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=dense_mask(case.lengths, case.left).to(q.device))
    grads = torch.autograd.grad(out, (q64, k64, v64), dout.double().transpose(1, 2))
    return [t.transpose(1, 2) for t in (out, *grads)]


def _check(case_name: str, system: str, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Raise Disagreement unless each of got (out, then the gradients, as far as given) is within
    fp32 rounding of want; a wrong mask moves results by a few hundredths."""
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = (g.double() - w).abs().max().item()
        tol = 1e-4 * max(1.0, w.abs().max().item())
        if not err <= tol:
            raise Disagreement(f"{BENCH} {case_name}: {system} disagrees with the float64 dense-mask reference: "
                               f"{what} max abs diff {err:.3g} > {tol:.3g}")


def _measure(ctx, case_name: str, system: System, q, k, v, dout, pairs: int, expected) -> list[Row]:
    dev, D = ctx.device, q.shape[-1]
    if not system.backward:
        q, k, v = (t.detach() for t in (q, k, v))
    out = system.fn(q, k, v)  # a backend that cannot take this case raises here
    if expected is not None and system.masked:
        got = [out, *torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)] if system.backward else [out]
        _check(case_name, system.name, got, expected)
    with torch.no_grad():
        fwd = time_ms(lambda: system.fn(q, k, v), dev)
    fwd_flops = 4 * D * pairs
    rows = ctx.compute_rows(BENCH, f"{case_name} fwd", system.name, fwd, fwd_flops)
    if system.backward:
        # autograd.grad, not backward: no .grad accumulation kernels inside the timing
        bwd = time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), dev)
        rows += ctx.compute_rows(BENCH, f"{case_name} bwd", system.name, bwd, 2.5 * fwd_flops)
    return rows


def _cases(quick: bool) -> list[list[MaskedCase]]:
    """The cases in groups that share shapes (and so one FlexAttention compile on CUDA)."""
    windows = [MaskedCase(B, H, D, (S,), left) for B, H, S, D, left in (QUICK_WINDOW_CASES if quick else WINDOW_CASES)]
    docs = [MaskedCase(1, H, D, tuple(document_lengths(total, shortest, longest)), -1)
            for total, shortest, longest, H, D in (QUICK_DOC_CASES if quick else DOC_CASES)]
    return [windows, docs]


def _dtype(device: torch.device) -> torch.dtype:
    """bf16 on the GPU (the kernels' dtype); float32 on the CPU, what training there runs in."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def run(ctx: BenchContext) -> Iterator[Row]:
    dev = ctx.device
    dtype = _dtype(dev)
    for group in _cases(ctx.quick):
        # A fresh compile per group of shapes: without it the next group's flex would recompile with
        # dynamic shapes (automatic dynamic).
        torch._dynamo.reset()
        compiled_flex = None
        if dev.type == "cuda":
            from torch.nn.attention.flex_attention import flex_attention

            compiled_flex = torch.compile(flex_attention)
        for case in group:
            name = case.name(dtype)
            q, k, v = (torch.randn(case.B, case.S, case.H, case.D, device=dev, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            dout = torch.randn_like(q)
            # (float32 only: bf16's rounding, --quick on the GPU, is larger than the check's fp32 tolerance)
            expected = _reference(case, q, k, v, dout) if ctx.quick and dtype == torch.float32 else None
            masked_pairs = case.B * case.H * admitted_pairs(case.lengths, case.left)
            full_pairs = case.B * case.H * admitted_pairs((case.S,), -1)
            for system in _systems(dev, case, compiled_flex):
                pairs = masked_pairs if system.masked else full_pairs
                yield from measure_system(BENCH, name, system.name, lambda: _measure(ctx, name, system, q, k, v, dout,
                                                                                     pairs, expected))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
