"""fmcore's kernels inside an existing Hugging Face transformers model, without rewriting it.

    import fmcore.hf
    model = AutoModelForCausalLM.from_pretrained(path)   # Llama, Mistral, Qwen2, Qwen3 or GPT-2
    fmcore.hf.apply_to(model)                            # norms, MLP, RoPE, attention, lm-head + loss

or fmcore's attention alone, for any model written on transformers' attention interface:

    fmcore.hf.register_attention()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fmcore")

This module imports transformers (the optional ``hf`` extra); ``import fmcore`` never does.

How transformers (5.x) is matched:
- Attention: HF calls ``fn(module, q, k, v, attention_mask, dropout=, scaling=, **kwargs)`` with
  (B, H, S, D) tensors (k and v with the kv heads, unrepeated) and wants (B, Sq, H, D) back; fmcore's
  kernel reads the transposed views in place. A name HF has no mask function for gets no mask at
  all (padding silently ignored), so a mask function is registered too. HF's SDPA convention reads a
  missing mask as torch's top-left causal mask (a static cache's prefill slices the keys down to the
  queries for it); fmcore's causal mask is bottom-right, as FlashAttention's (on which transformers'
  flash-attention integration relies for a decode step or a chunk after a cache). Our mask function
  therefore returns None only when the mask is exactly the bottom-right causal one (no padding, the
  queries the last tokens of the keys: a prefill, a decode step, a chunk after a dynamic cache), and
  builds HF's boolean mask where the kernel cannot apply it (a static cache's keys past the tokens, a
  mask function it does not recognise).
- Padding and packing, on fmcore's varlen kernel. Over padding (training, prefill, decoding against a
  padded dynamic cache) the mask function hands attention the (B, Sk) bool mask; attention moves each
  row's tokens before its padding (a stable sort) and runs three documents a row: the tokens, the
  padded queries with no key (output 0, as transformers' FlashAttention path leaves them), the padded
  keys with no query. The shapes stay static, so this needs no host sync and compiles, where
  transformers' unpadding reads back a nonzero and a max. Packed sequences (position_ids restarting,
  as DataCollatorWithFlattening makes them) are what HF's own mask creation detects (no attention
  mask, no cache); its mask function then carries the document ids, which ours turns into cu_seqlens
  once a forward (under torch.compile, where HF marks every such batch packed, unable to read the ids
  either, the mask is materialised). HF's mask functions are recognised by their closures' code, so a
  transformers that builds them otherwise runs SDPA rather than being misread. A 4-D mask, dropout, or
  an input the kernel does not cover goes to HF's own SDPA function (our 1-D and 2-D forms made 4-D),
  with a one-time warning naming the reason; softcap and s_aux (attention sinks), which that function
  does not compute either, are refused.
- Sliding windows (Mistral's, Qwen's sliding layers), on the kernel's window_size, in each case above.
  HF's window of W shows a query itself and the W - 1 keys before it (``kv_idx > q_idx - W``):
  window_size (W - 1, 0), aligned bottom-right as causal is. The mask function is the authority (its
  mask is what HF's SDPA and eager paths compute, and what a fallback materialises): it hands back
  HF's sliding-window mask as any of the forms above in a ``_Windowed(form, W)``, and attention checks
  the layer's ``sliding_window`` keyword (what HF's FlashAttention path reads instead) against it;
  where the two differ on these keys, the mask's attention runs on SDPA, with the warning. A dynamic
  cache's sliding layer keeps only the last W - 1 keys, and HF offsets the mask by those it dropped:
  the queries are still the last keys (a decode step's W keys need no window). A window counts the
  padded positions too, which the varlen layout moves out: over padding, a window that hides keys runs
  there only when each row's tokens are contiguous (a second value read; under torch.compile, which
  cannot read it, the mask is materialised).
- RoPE: HF's cos/sin tables (any rope_type: scaling is already in them) are rotated in by fmcore's
  op in the (B, S, H, D) layout the projections produce, before the transposes (after Qwen3's
  q_norm and k_norm).
- Decoder layers: the residual add after attention and the norm after it are one ``add_norm``, which
  returns both. The forward bound to the layer instance replaces the one HF's gradient checkpointing
  wraps at class creation, so it checkpoints itself as that one does.
- Loss: ``ForCausalLMLoss`` (labels shifted left and padded with ignore_index, mean over the kept
  tokens, or a sum over ``num_items_in_batch`` when the Trainer passes it, ``shift_labels`` taken
  as given, an fp32 loss) computed by ``linear_cross_entropy`` from the final hidden states.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import warnings
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

# The oldest transformers whose attention, mask and cache conventions this module matches: with 5.23
# a cached generation computed wrong logits (silently) and packed sequences and sliding windows
# failed. transformers 5.21 and later need Python 3.11.
MIN_TRANSFORMERS = (5, 24)

try:
    import transformers
except ImportError as e:  # (the tests skip without transformers)
    raise ImportError("fmcore.hf needs transformers: pip install 'fmcore[hf]'") from e
if tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups()) < MIN_TRANSFORMERS:
    raise ImportError(f"fmcore.hf needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (Python 3.11 or "
                      f"later), found {transformers.__version__}: pip install -U 'fmcore[hf]'")
from transformers import (AttentionInterface, GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM,
                          Qwen2ForCausalLM, Qwen3ForCausalLM)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.masking_utils import (AttentionMaskInterface, and_masks, causal_mask_function,
                                       packed_sequence_mask_function, remap_positions_for_packed_sequence, sdpa_mask,
                                       sliding_window_causal_mask_function, sliding_window_overlay)
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.pytorch_utils import Conv1D
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Block
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm,
                                                      eager_attention_forward)
from transformers.models.mistral.modeling_mistral import (MistralAttention, MistralDecoderLayer, MistralMLP,
                                                          MistralRMSNorm)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2MLP, Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3DecoderLayer, Qwen3MLP, Qwen3RMSNorm
from transformers.utils.import_utils import is_tracing

from fmcore.nn.rotary import apply_rotary_pos_emb
from fmcore.ops import add_norm, bias_gelu, flash_attention, flash_attention_varlen, linear_cross_entropy, swiglu
from fmcore.ops._common import autocast_dtype
from fmcore.ops.attention import _sdpa_fallback_reason

__all__ = ["NAME", "apply_to", "attention_forward", "register_attention"]

NAME = "fmcore"

# ---- attention: transformers' AttentionInterface and AttentionMaskInterface

_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned and not torch.compiler.is_compiling():
        _warned.add(reason)
        warnings.warn(f"fmcore.hf attention: falling back to transformers' SDPA ({reason}); this warning is shown "
                      "once per reason", stacklevel=3)


def _fallback_reason(query, key, value, attention_mask, window, dropout, kwargs) -> str | None:
    if attention_mask is not None and attention_mask.dim() > 2:
        return ("an attention mask beyond padding, packed documents and a sliding window: a static cache, a sliding "
                "window over padding between tokens, or a custom mask")
    given = kwargs.get("sliding_window")
    if _hides_keys(given, key.shape[2]) != window:
        # (not naming the number of keys: decoding would make each step's reason another, warned again)
        return (f"the layer's sliding_window={given} disagrees with its attention mask's window ({window}); "
                "running the mask's")
    if dropout > 0.0:
        return "attention dropout in training"
    if kwargs.get("position_bias") is not None:
        return "position_bias is not supported"
    # The kernel's own limits (device, dtype, head dim, head counts); the causal alignment is ours (_mask).
    return _sdpa_fallback_reason(query, key, value, None, 0.0, False, True)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: q (B, Hq, Sq, D), k/v (B, Hk, Sk, D) in, (B, Sq, Hq, D) out and
    no attention weights. attention_mask is what the mask function ``_mask`` made: None (causal aligned
    bottom-right, or none), a (B, Sk) bool padding mask or a packed batch's int32 cu_seqlens (causal, on
    the varlen kernel), any of these in a ``_Windowed`` (causal within a sliding window, which the
    ``sliding_window`` keyword must agree with), or a 4-D mask, which runs transformers' SDPA function,
    as does anything else the kernel does not cover."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    dtypes = [autocast_dtype(t) for t in (query, key, value)]  # what torch's SDPA computes in under autocast
    q, k, v = [t if d is None else t.to(d) for t, d in zip((query, key, value), dtypes)]
    attention_mask, window = attention_mask if isinstance(attention_mask, _Windowed) else (attention_mask, None)
    window = _hides_keys(window, key.shape[2])
    _check_mask(attention_mask, query, key)
    for name, what in (("softcap", "logit soft-capping"), ("s_aux", "attention sinks")):
        # Not for the fallback either: transformers' SDPA raises on softcap and ignores s_aux (gpt-oss's
        # logits came out 0.3 off its eager attention's, with only the fallback's warning).
        if kwargs.get(name) is not None:
            raise ValueError(f"fmcore.hf attention: {name} ({what}) is computed neither by fmcore's kernel nor by "
                             "transformers' SDPA, its fallback; load this model with attn_implementation='eager'")
    reason = _fallback_reason(q, k, v, attention_mask, window, dropout, kwargs)
    if reason is not None:
        _warn_once(reason)
        return sdpa_attention_forward(module, query, key, value,
                                      _sdpa_mask(attention_mask, query, key, causal, window),
                                      dropout=dropout, scaling=scaling, is_causal=causal, **kwargs)
    # HF's window of W: the query and the W - 1 keys before it (the window is causal, whatever is_causal says)
    window_size = (-1, -1) if window is None else (window - 1, 0)
    if attention_mask is not None:
        return _varlen_attention(q, k, v, attention_mask, scaling, window_size), None
    # One query sees every key either way; non-causal lets the CPU use torch's fused kernel for it.
    out = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          causal=causal and q.shape[2] > 1, softmax_scale=scaling, window_size=window_size)
    return out, None


class _Windowed(NamedTuple):
    """The mask function's form (None, padding mask or cu_seqlens) of a causal mask within HF's sliding window
    of ``window``: each query sees itself and the window - 1 keys before it."""
    mask: torch.Tensor | None
    window: int
    # With a static cache, transformers' generate makes the mask of a model without layer_types (Mistral)
    # before the forward and passes it back in as the attention_mask, whose ndim HF reads (a 2-D padding
    # mask is converted); the mask function then returns it as it is, made for this very step.
    ndim = 0


def _hides_keys(window, kv_length) -> int | None:
    """An HF sliding window (None: none) if it hides some of kv_length keys from the last of them (the farthest
    is kv_length - 1 back, a window of W reaches W - 1 back), else None."""
    return window if window is not None and window < kv_length else None


def _check_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> None:
    """The 1-D and 2-D forms are the mask function's own; anything else of those ranks is refused, never read
    (a 0/1 int tokenizer mask passed straight here would otherwise be misread)."""
    if mask is None or mask.dim() > 2:
        return
    B, sk = query.shape[0], key.shape[2]
    if mask.dim() == 2 and (mask.dtype != torch.bool or tuple(mask.shape) != (B, sk)):
        raise ValueError(f"expected attention_mask of fmcore.hf's mask function: a bool (B, Sk) = {(B, sk)} padding "
                         f"mask, got {mask.dtype} of shape {tuple(mask.shape)}")
    if mask.dim() == 1 and (mask.dtype != torch.int32 or query.shape[2] != sk):
        raise ValueError(f"expected attention_mask of fmcore.hf's mask function: int32 cu_seqlens of a packed batch "
                         f"(queries = keys), got {mask.dtype} of shape {tuple(mask.shape)} for {query.shape[2]} "
                         f"queries and {sk} keys")


def _sdpa_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, causal: bool,
               window: int | None = None):
    """What HF's SDPA function needs to compute what fmcore's kernel would have: the mask forms (and the
    window) made explicit."""
    B, sq, sk = query.shape[0], query.shape[2], key.shape[2]
    if mask is None and window is None:
        # HF's SDPA reads a missing mask top-left; ours means bottom-right.
        return torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq) \
            if causal and sq > 1 and sq != sk else None
    args = dict(batch_size=B, q_length=sq, kv_length=sk, allow_is_causal_skip=False, device=query.device)
    causal_fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    if mask is None or mask.dim() == 2:  # (padding:) causal over the (valid) keys, the queries the last of them
        return sdpa_mask(q_offset=sk - sq, attention_mask=mask, mask_function=causal_fn, **args)
    if mask.dim() == 1:  # cu_seqlens: causal within each document
        docs = torch.searchsorted(mask, torch.arange(B * sk, dtype=mask.dtype, device=mask.device), right=True)
        return sdpa_mask(mask_function=and_masks(causal_fn, packed_sequence_mask_function(docs.view(B, sk))), **args)
    return mask


class _Layout(NamedTuple):
    """A batch on the varlen kernel: its (B * S) flattened rows reordered by q_order / k_order (None: as
    they are; q_back undoes q_order on the output) into the documents of cu_q / cu_k."""
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    q_order: torch.Tensor | None = None
    q_back: torch.Tensor | None = None
    k_order: torch.Tensor | None = None


def _varlen_attention(q, k, v, mask: torch.Tensor, scale: float | None, window_size: tuple[int, int]) -> torch.Tensor:
    """Causal attention (within window_size) within each row's valid tokens or each packed document: q (B, Hq,
    Sq, D), k/v (B, Hk, Sk, D) in, (B, Sq, Hq, D) out, 0 at padded queries (what transformers' FlashAttention
    path leaves)."""
    B, hq, sq, d = q.shape
    layout = _layout(mask, sq)
    q, k, v = [t.transpose(1, 2).reshape(-1, t.shape[1], d) for t in (q, k, v)]
    if layout.q_order is not None:
        q, k, v = q[layout.q_order], k[layout.k_order], v[layout.k_order]
    out = flash_attention_varlen(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, causal=True,
                                 softmax_scale=scale, window_size=window_size)
    if layout.q_back is not None:
        out = out[layout.q_back]
    return out.view(B, sq, hq, d)


_last_layout: list = [None]  # [(weakref to the mask, (its version, Sq), its _Layout)]


def _layout(mask: torch.Tensor, sq: int) -> _Layout:
    """The mask's layout, made once for all the layers of a forward (they get the same mask tensor): one
    cu_seqlens, whose values flash_attention_varlen then checks once on CUDA (a host sync), as a packed
    batch's max_seqlen is read once."""
    memo = not torch.compiler.is_compiling() and not mask.is_inference()  # (inference tensors have no version)
    hit = _last_layout[0]
    if memo and hit is not None and hit[0]() is mask and hit[1] == (mask._version, sq):
        return hit[2]
    if mask.dim() == 1:
        longest = int(mask.diff().max())
        layout = _Layout(mask, mask, longest, longest)
    else:
        layout = _padding_layout(mask, sq)
    if memo:
        _last_layout[0] = (weakref.ref(mask), (mask._version, sq), layout)
    return layout


def _padding_layout(mask: torch.Tensor, sq: int) -> _Layout:
    """Each row's valid tokens moved first (in order), then its padding, as three documents: the valid
    queries with the valid keys, the padded queries with no key (their output 0), no query with the
    padded keys. The queries are the last Sq keys (the mask function's condition), so that the kernel's
    bottom-right causal alignment shows each valid query the valid keys up to itself. Unlike
    transformers' unpadding (a nonzero and a max read back), every shape is static: no host sync, and it
    compiles; the rows stay B * S, the padded ones costing no attention."""
    B, sk = mask.shape
    qmask = mask[:, sk - sq:]
    nq, nk = qmask.sum(1, dtype=torch.int32), mask.sum(1, dtype=torch.int32)
    row = torch.arange(B, dtype=torch.int32, device=mask.device)
    cu_q = F.pad(torch.stack([row * sq + nq, (row + 1) * sq, (row + 1) * sq], 1).flatten(), (1, 0))
    cu_k = F.pad(torch.stack([row * sk + nk, row * sk + nk, (row + 1) * sk], 1).flatten(), (1, 0))
    q_order = _valid_first(qmask)
    k_order = q_order if sq == sk else _valid_first(mask)
    return _Layout(cu_q, cu_k, sq, sk, q_order, torch.argsort(q_order), k_order)


def _valid_first(mask: torch.Tensor) -> torch.Tensor:
    """The flat indices of a (B, S) mask's tokens: row by row, the valid ones (in order), then the padding."""
    row = torch.arange(mask.shape[0], device=mask.device)[:, None]
    return torch.argsort((2 * row + ~mask).flatten(), stable=True)


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
          attention_mask=None, allow_is_causal_skip=True, **kwargs):
    """The mask for ``attention_forward``: None when it is the bottom-right causal one fmcore's kernel
    applies by itself; the (B, Sk) bool padding mask of a causal mask over padding, or the int32
    cu_seqlens of HF's packed sequences (both for the varlen kernel); any of these in a ``_Windowed``
    for HF's sliding-window causal mask; else HF's boolean (B, 1, Sq, Sk) SDPA mask, never HF's None
    (which its SDPA function reads top-left)."""
    if isinstance(attention_mask, _Windowed):  # (made by this function for this step: see _Windowed)
        return attention_mask
    # The queries are the last keys (not with a static cache: tensor offsets, keys run to max_cache_len).
    # (A dynamic cache's sliding layer offsets kv by the keys it dropped: its queries are the last keys too.)
    last = (all(isinstance(x, (int, torch.SymInt)) for x in (q_offset, kv_offset))
            and statically_known_true(q_offset + q_length == kv_offset + kv_length))
    # (Reading the document ids needs their values: under torch.compile, where HF marks every batch packed,
    # unable to read them either, packed batches take the SDPA mask.)
    docs, fn = _documents(mask_function) if last and not torch.compiler.is_compiling() else (None, mask_function)
    causal, window = _causal_window(fn)
    if causal and docs is not None:
        starts = F.pad(docs[:, 1:] != docs[:, :-1], (1, 0), value=True).flatten()  # each row starts one too
        return _with_window(F.pad(starts.nonzero().flatten().to(torch.int32), (0, 1), value=docs.numel()), window)
    if (causal and last and allow_is_causal_skip
            and (attention_mask is None or attention_mask.shape[-1] >= kv_offset + kv_length)):
        if attention_mask is None:
            return _with_window(None, window)
        mask = attention_mask[:, kv_offset:kv_offset + kv_length]
        # Reading the values under torch.compile would break the graph: there the varlen path runs either way,
        # or, for a window that hides keys, which padding between tokens would shift, the mask is materialised.
        hides = _hides_keys(window, kv_length) is not None
        if not is_tracing(mask):
            if bool(mask.all()):
                return _with_window(None, window)
            if not hides or _contiguous(mask):
                return _with_window(mask, window)
        elif not hides:
            return _with_window(mask, window)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kwargs)


def _with_window(form: torch.Tensor | None, window: int | None):
    return form if window is None else _Windowed(form, window)


def _contiguous(mask: torch.Tensor) -> bool:
    """Whether each row of a (B, S) bool padding mask holds its tokens in one run (a value read). HF's window
    counts positions, padded ones too, and the varlen layout moves the padding out: a window across
    padding between tokens would reach further there."""
    runs = mask[:, 0].int() + (mask[:, 1:] & ~mask[:, :-1]).sum(1)
    return bool((runs <= 1).all())


# HF's mask-function closures, recognised by their code: masks a transformers builds otherwise are not
# recognised, and go to SDPA materialised, never misread.
_AND, _REMAP, _PACKED, _WINDOW = [f.__code__ for f in (and_masks(), remap_positions_for_packed_sequence(None, None),
                                                       packed_sequence_mask_function(None), sliding_window_overlay(0))]


def _cells(fn) -> dict:
    """A closure's free variables by name."""
    return dict(zip(fn.__code__.co_freevars, [c.cell_contents for c in fn.__closure__ or ()]))


def _parts(fn, code) -> tuple:
    """The functions HF's and_masks(...) intersects when fn is one of two of which the first has this code."""
    if getattr(fn, "__code__", None) is not _AND:
        return ()
    parts = _cells(fn)["mask_functions"]
    return parts if len(parts) == 2 and getattr(parts[0], "__code__", None) is code else ()


# Dynamo reads a closure's cells from torch 2.14 on. Before, under torch.compile, only HF's plain causal
# mask function is recognised (by identity); its other masks, sliding windows included, are materialised.
_TRACES_CLOSURES = torch.__version__ >= "2.14"


def _causal_window(fn) -> tuple[bool, int | None]:
    """Whether fn is HF's causal mask function, plain (window None) or within a sliding window
    (sliding_window_causal_mask_function), and that window."""
    if fn is causal_mask_function:
        return True, None
    if not _TRACES_CLOSURES and torch.compiler.is_compiling():
        return False, None
    parts = _parts(fn, _WINDOW)
    if not parts or parts[1] is not causal_mask_function:
        return False, None
    window = _cells(parts[0])["sliding_window"]
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:  # (not HF's: not read)
        return False, None
    return True, window


def _documents(fn) -> tuple[torch.Tensor | None, object]:
    """HF's packed-sequence mask (fn): its (B, S) document ids and the mask function within each document;
    else (None, fn)."""
    parts = _parts(fn, _REMAP)
    if parts and getattr(parts[1], "__code__", None) is _PACKED:
        return _cells(parts[1])["packed_sequence_mask"], _cells(parts[0])["mask_function"]
    return None, fn


def register_attention() -> str:
    """Make ``attn_implementation="fmcore"`` available to transformers (idempotent); returns the name."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


# ---- the modules apply_to patches (each a forward bound to one instance)

# Llama's modules and their copies in the families that share them (transformers' "Copied from" classes,
# not subclasses). Qwen3's attention adds RMSNorms on the head dim (q_norm, k_norm); Mistral's and Qwen's
# pass a sliding window, which attention checks against the mask function's.
_RMS_NORMS = (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm)
_SWIGLU_MLPS = (LlamaMLP, MistralMLP, Qwen2MLP, Qwen3MLP)
_ATTENTIONS = (LlamaAttention, MistralAttention, Qwen2Attention, Qwen3Attention)
_DECODER_LAYERS = (LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer)


def _rms_norm_forward(self: LlamaRMSNorm, x: torch.Tensor) -> torch.Tensor:
    return _rms_norm(self, x, None)[0]


def _rms_norm(norm: LlamaRMSNorm, x: torch.Tensor, residual: torch.Tensor | None):
    """add_norm for an HF RMSNorm. HF returns weight * normed.to(x.dtype): an fp32 weight on a bf16 stream
    gives fp32."""
    stream = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return add_norm(x, residual, norm.weight, eps=norm.variance_epsilon, kind="rms",
                    out_dtype=torch.promote_types(stream, norm.weight.dtype))


def _layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return add_norm(x, None, self.weight, self.bias, eps=self.eps, kind="layer")[0]


def _swiglu_mlp_forward(self: LlamaMLP, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _gelu_mlp_forward(approximate: str):
    def forward(self: GPT2MLP, x: torch.Tensor) -> torch.Tensor:
        if type(self.c_fc) is Conv1D:
            # Conv1D is x @ weight + bias, weight (in, out); the bias joins the GELU, its gradient summed there.
            h = bias_gelu(torch.matmul(x, self.c_fc.weight), self.c_fc.bias, approximate=approximate)
        else:
            # A wrapper added after apply_to (peft's LoRA layers show their base layer's weight and bias): its
            # forward, whose adapter reading the weight alone dropped, silently.
            h = bias_gelu(self.c_fc(x), approximate=approximate)
        return self.dropout(self.c_proj(h))

    return forward


# GPT-2's activation_function -> the GPT2MLP forward (a closure, not a partial: dynamo cannot bind those)
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
_GELU_MLP_FORWARD = {name: _gelu_mlp_forward(approximate) for name, approximate in _GELU.items()}


def _llama_attention_forward(self: LlamaAttention, hidden_states: torch.Tensor,
                             position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                             attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
    """LlamaAttention.forward (Mistral's, Qwen2's, Qwen3's) with fmcore's RoPE, applied in the (B, S, H, D)
    layout of the projections."""
    input_shape = hidden_states.shape[:-1]
    shape = (*input_shape, -1, self.head_dim)
    q, k = self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if hasattr(self, "q_norm"):  # Qwen3
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    # Qwen's window is per layer (None on full-attention layers), Mistral's in the config (Llama has none).
    window = self.sliding_window if hasattr(self, "sliding_window") else getattr(self.config, "sliding_window", None)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attention(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                             scaling=self.scaling, sliding_window=window, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


# The decoder layers, with the residual add after attention fused into the next norm: add_norm returns
# the stream and its norm from one pass. (Across layers, the MLP's add joining the next layer's input norm,
# a layer would have to return the unadded pair: HF records each layer's output as a hidden state, and
# checkpoints, caches and hooks it as one tensor, so that add stays HF's.)


def _rms_decoder_layer_forward(self: LlamaDecoderLayer, hidden_states: torch.Tensor, attention_mask=None,
                               position_ids=None, cache=None, use_cache=False, position_embeddings=None, **kwargs):
    """LlamaDecoderLayer.forward (Mistral's, Qwen2's, Qwen3's): the stream and the post-attention RMSNorm
    from one add_norm."""
    h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                          position_ids=position_ids, cache=cache, use_cache=use_cache,
                          position_embeddings=position_embeddings, **kwargs)
    norm = self.post_attention_layernorm
    if not isinstance(norm, _RMS_NORMS):  # wrapped after apply_to (see _wrapped_norm)
        return _wrapped_norm(self, norm, h, hidden_states)
    normed, stream = _rms_norm(norm, h, hidden_states)
    return stream + self.mlp(normed)


def _gpt2_block_forward(self: GPT2Block, hidden_states: torch.Tensor, cache=None, attention_mask=None,
                        encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False, **kwargs):
    """GPT2Block.forward of a block without cross-attention (which sits between the two, and keeps HF's
    forward): the stream and ln_2 from one add_norm."""
    if encoder_hidden_states is not None:  # (as HF's)
        raise ValueError(f"encoder_hidden_states given to a GPT2Block without cross-attention ({self})")
    h, _ = self.attn(self.ln_1(hidden_states), cache=cache, attention_mask=attention_mask, use_cache=use_cache,
                     **kwargs)
    if type(self.ln_2) is not nn.LayerNorm:  # wrapped after apply_to (see _wrapped_norm)
        return _wrapped_norm(self, self.ln_2, h, hidden_states)
    normed, stream = add_norm(h, hidden_states, self.ln_2.weight, self.ln_2.bias, eps=self.ln_2.eps, kind="layer")
    return stream + self.mlp(normed)


def _wrapped_norm(layer: nn.Module, norm: nn.Module, h: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """The rest of a decoder layer whose norm after attention was wrapped after apply_to (peft's LN tuning, whose
    weight attribute is the frozen base layer's while its forward runs a trained copy): HF's add, then the norm's
    own forward. Reading its weight trained nothing (a wrapper without eps raised AttributeError)."""
    stream = hidden_states + h
    return stream + layer.mlp(norm(stream))


def _checkpointed(layer_forward):
    """A decoder layer's forward that checkpoints itself under HF's gradient checkpointing. HF checkpoints in
    the forward its GradientCheckpointingLayer classes get when defined, which a forward bound to the
    instance replaces; this does what that one does (the replay must not write the cache a second time)."""

    @functools.wraps(layer_forward)
    def forward(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            if kwargs.get("cache") is not None:
                kwargs["cache"] = None
            return self._gradient_checkpointing_func(functools.partial(layer_forward, self, **kwargs), *args)
        return layer_forward(self, *args, **kwargs)

    return forward


_RMS_DECODER_LAYER_FORWARD = _checkpointed(_rms_decoder_layer_forward)
_GPT2_BLOCK_FORWARD = _checkpointed(_gpt2_block_forward)


# ---- the lm head and its loss

# Which output class each supported model's forward returns, for the fused loss path that bypasses it.
_OUTPUTS = {LlamaForCausalLM: CausalLMOutputWithPast, MistralForCausalLM: CausalLMOutputWithPast,
            Qwen2ForCausalLM: CausalLMOutputWithPast, Qwen3ForCausalLM: CausalLMOutputWithPast,
            GPT2LMHeadModel: CausalLMOutputWithCrossAttentions}


def _causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, num_items_in_batch=None,
                    ignore_index: int = -100, shift_labels: torch.Tensor | None = None, **_) -> torch.Tensor:
    """transformers' ForCausalLMLoss of head(hidden), without the logits."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    kw = dict(bias=head.bias, ignore_index=ignore_index, reduction=reduction)
    dev = hidden.device.type
    if hidden.dtype in (torch.bfloat16, torch.float16) and head.weight.dtype == hidden.dtype \
            and dev in ("cpu", "cuda") and not torch.is_autocast_enabled(dev):
        # HF upcasts the logits: an fp32 loss. The op returns its loss in hidden's dtype (a bf16 rounding)
        # except under autocast, here to hidden's own dtype, which casts nothing (train.models.common.lm_loss).
        with torch.autocast(dev, dtype=hidden.dtype):
            loss = linear_cross_entropy(hidden, head.weight, target, **kw)
    else:
        loss = linear_cross_entropy(hidden, head.weight, target, **kw).float()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _fused_loss_forward(cls: type):
    """cls.forward for one instance: given labels (as keywords) in training, HF's loss from
    linear_cross_entropy and logits None; everything else runs cls.forward. A function of self, bound
    to the instance (a closure over the model would make a deepcopy of it, such as TRL's reference
    model, run the original's weights); its signature is cls.forward's, which generate and the
    Trainer read."""
    out_cls = _OUTPUTS[cls]
    fields = {f.name for f in dataclasses.fields(out_cls)} - {"loss", "logits"}
    # The arguments before labels are the base model's own, in the same order (in every class of _OUTPUTS).
    n_base = list(inspect.signature(cls.forward).parameters).index("labels") - 1  # (less self)

    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        skip_logits = kwargs.pop("skip_logits", None)
        skip = self.training if skip_logits is None else skip_logits
        if (kwargs.get("labels") is None or not skip or len(args) > n_base or type(self.lm_head) is not nn.Linear
                or not _default_loss(self)):
            return cls.forward(self, *args, **kwargs)  # HF's path: its logits, or a loss the user configured
        labels = kwargs.pop("labels")
        return_dict = kwargs.pop("return_dict", None)  # (what cls.forward's @can_return_tuple does)
        if return_dict is None:
            return_dict = self.config.return_dict
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        outputs = self.base_model(*args, **kwargs)
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        loss = _causal_lm_loss(hidden, self.lm_head, labels, **kwargs)
        out = out_cls(loss=loss, logits=None, **{k: v for k, v in outputs.items() if k in fields})
        return out if return_dict else out.to_tuple()

    return forward


def _default_loss(model: nn.Module) -> bool:
    """Whether model.loss_function is HF's ForCausalLMLoss, without the property (which logs a warning,
    a graph break under torch.compile, for GPT-2, whose loss_type is None)."""
    return "_loss_function" not in vars(model) and \
        LOSS_MAPPING.get(getattr(model, "loss_type", None), ForCausalLMLoss) is ForCausalLMLoss


_FUSED_LOSS_FORWARD = {cls: _fused_loss_forward(cls) for cls in _OUTPUTS}


# ---- pickling a patched model

def _getstate(self: nn.Module) -> dict:
    """A patched module's __getstate__ (pickle reads it from the instance): its state with the methods
    bound to it by apply_to as _Rebind. A bound method pickles as getattr(module, its function's name),
    which the module being unpickled does not have: torch.save(model) wrote a file whose torch.load
    raised "'LlamaAttention' object has no attribute '_llama_attention_forward'"."""
    state = type(self).__getstate__(self)
    # Wherever they are now: a library wrapping the module after apply_to (accelerate's hooks) keeps our
    # forward as _old_forward and puts its own in forward.
    for attr, value in state.items():
        if isinstance(value, types.MethodType) and value.__self__ is self and value.__func__ in _NAMES:
            state[attr] = _Rebind(_NAMES[value.__func__], self)
    return state


class _Rebind(NamedTuple):
    """One of apply_to's bound methods in a pickle (and a deepcopy): loaded as that method bound to the
    loaded module."""

    name: str
    module: nn.Module

    def __reduce__(self):
        return _bind, (self.name, self.module)


def _bind(name: str, module: nn.Module) -> types.MethodType:
    register_attention()  # a model loaded in a new process still names attn_implementation "fmcore"
    return types.MethodType(_PATCHED[name], module)


# apply_to's functions by a name that pickles (some are closures, which pickle cannot name).
_PATCHED = {"rms_norm": _rms_norm_forward, "layer_norm": _layer_norm_forward, "swiglu_mlp": _swiglu_mlp_forward,
            "llama_attention": _llama_attention_forward, "rms_decoder_layer": _RMS_DECODER_LAYER_FORWARD,
            "gpt2_block": _GPT2_BLOCK_FORWARD, "getstate": _getstate,
            **{f"gelu_mlp:{act}": f for act, f in _GELU_MLP_FORWARD.items()},
            **{f"loss:{cls.__name__}": f for cls, f in _FUSED_LOSS_FORWARD.items()}}
_NAMES = {f: name for name, f in _PATCHED.items()}
_OURS = set(_PATCHED.values()) - {_getstate}


# ---- apply_to


def apply_to(model: nn.Module, *, attention: bool = True, rope: bool = True, norm: bool = True,
             residual: bool = True, mlp: bool = True, loss: bool = True) -> nn.Module:
    """Swap fmcore's kernels into ``model`` (this instance only; other models of its class are untouched).

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``
            or ``GPT2LMHeadModel`` (anything else, Gemma's included, is refused by name; apply it before
            wrapping the model in peft, DDP or FSDP).
        attention: ``attn_implementation="fmcore"`` (see ``register_attention``): fmcore's flash attention,
            on its varlen kernel for padded batches (training, prefill and decoding with a dynamic cache)
            and for packed sequences (position_ids restarting, as DataCollatorWithFlattening makes them),
            within Mistral's or Qwen's sliding window by the kernel's window_size.
        rope: fmcore's RoPE op on HF's cos/sin tables (all but GPT-2).
        norm: RMSNorm (Qwen3's q_norm and k_norm too) / LayerNorm (GPT-2) by ``fmcore.ops.add_norm``.
        residual: each decoder layer's residual add after attention and the norm after it in one
            ``add_norm`` (the layer's forward; HF's gradient checkpointing still checkpoints it).
        mlp: SwiGLU (hidden_act "silu") / bias + GELU (GPT-2, "gelu_new", "gelu_pytorch_tanh" or "gelu")
            by fmcore's fused activations.
        loss: with ``labels`` in training (``model.train()``), the lm head and HF's causal-LM loss by
            ``linear_cross_entropy``, which never holds the logits: the output's logits are None (a
            tuple output is (loss, cache, ...)). ``model(..., skip_logits=False)`` (or eval mode) keeps
            HF's path and its logits; ``skip_logits=True`` takes the fused path in eval mode too.
    Returns the model. Applying it again is harmless; a False flag leaves that part as it is.
    """
    if type(model) not in _OUTPUTS:
        names = ", ".join(c.__name__ for c in _OUTPUTS)
        raise TypeError(f"fmcore.hf.apply_to supports {names}, got {type(model).__name__}")
    gpt2 = isinstance(model, GPT2LMHeadModel)
    config = model.config
    if mlp:
        field = "activation_function" if gpt2 else "hidden_act"
        act = getattr(config, field)
        if act not in (_GELU if gpt2 else ("silu",)):
            raise ValueError(f"fmcore.hf.apply_to: no fused MLP for the {field} {act!r} of this "
                             f"{type(model).__name__} (pass mlp=False)")
    patches = []  # (module, forward), checked before any is made
    for module in model.modules():
        if norm and isinstance(module, _RMS_NORMS):
            patches.append((module, _rms_norm_forward))
        elif norm and gpt2 and isinstance(module, nn.LayerNorm) and module.weight is not None:
            patches.append((module, _layer_norm_forward))
        elif mlp and isinstance(module, _SWIGLU_MLPS):
            patches.append((module, _swiglu_mlp_forward))
        elif mlp and isinstance(module, GPT2MLP):
            patches.append((module, _GELU_MLP_FORWARD[config.activation_function]))
        elif rope and isinstance(module, _ATTENTIONS):
            patches.append((module, _llama_attention_forward))
        # (the layer reads the norm's weight: only HF's own norm class there, not another library's module)
        elif residual and isinstance(module, _DECODER_LAYERS) and isinstance(module.post_attention_layernorm,
                                                                              _RMS_NORMS):
            patches.append((module, _RMS_DECODER_LAYER_FORWARD))
        elif residual and isinstance(module, GPT2Block) and not hasattr(module, "crossattention") \
                and type(module.ln_2) is nn.LayerNorm and module.ln_2.weight is not None:
            patches.append((module, _GPT2_BLOCK_FORWARD))
    if loss:
        patches.append((model, _FUSED_LOSS_FORWARD[type(model)]))
    for module, _ in patches:
        # Another library's per-instance forward (accelerate's device_map hooks, ...) would be dropped.
        bound = vars(module).get("forward")
        if bound is not None and getattr(bound, "__func__", None) not in _OURS:
            raise ValueError(f"fmcore.hf.apply_to: the forward of this {type(module).__name__} was already replaced "
                             f"on the instance ({bound!r}); apply fmcore.hf.apply_to first")
    for module, forward in patches:
        module.forward = types.MethodType(forward, module)
        module.__getstate__ = types.MethodType(_getstate, module)
    if attention:
        register_attention()
        model.set_attn_implementation(NAME)
    return model
