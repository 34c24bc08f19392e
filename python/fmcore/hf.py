"""fmcore's kernels inside an existing Hugging Face transformers model, without rewriting it.

    import fmcore.hf
    model = AutoModelForCausalLM.from_pretrained(path)   # a LlamaForCausalLM or GPT2LMHeadModel
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
  queries the last tokens of the keys: a prefill, a decode step, a chunk after a dynamic cache),
  and builds HF's boolean mask otherwise; a mask, dropout, or an input the kernel does not cover
  goes to HF's own SDPA function, with a one-time warning naming the reason.
- RoPE: HF's cos/sin tables (any rope_type: scaling is already in them) are rotated in by fmcore's
  op in the (B, S, H, D) layout the projections produce, before the transposes.
- Loss: ``ForCausalLMLoss`` (labels shifted left and padded with ignore_index, mean over the kept
  tokens, or a sum over ``num_items_in_batch`` when the Trainer passes it, ``shift_labels`` taken
  as given, an fp32 loss) computed by ``linear_cross_entropy`` from the final hidden states.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

try:
    from transformers import AttentionInterface, GPT2LMHeadModel, LlamaForCausalLM
except ImportError as e:  # (the tests skip without transformers)
    raise ImportError("fmcore.hf needs transformers: pip install 'fmcore[hf]'") from e
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, eager_attention_forward
from transformers.utils.import_utils import is_tracing

from fmcore.nn.rotary import apply_rotary_pos_emb
from fmcore.ops import add_norm, bias_gelu, flash_attention, linear_cross_entropy, swiglu
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


def _fallback_reason(query, key, value, attention_mask, dropout, kwargs) -> str | None:
    if attention_mask is not None:
        return "an attention mask: padding, packed sequences, a sliding window or a static cache"
    if dropout > 0.0:
        return "attention dropout in training"
    for name in ("position_bias", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            return f"{name} is not supported"
    # The kernel's own limits (device, dtype, head dim, head counts); the causal alignment is ours (_mask).
    return _sdpa_fallback_reason(query, key, value, None, 0.0, False, True)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: q (B, Hq, Sq, D), k/v (B, Hk, Sk, D) in, (B, Sq, Hq, D) out and
    no attention weights. Without a mask, causal attention is aligned bottom-right (see the module
    docstring); anything else runs transformers' SDPA function."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    dtypes = [autocast_dtype(t) for t in (query, key, value)]  # what torch's SDPA computes in under autocast
    q, k, v = [t if d is None else t.to(d) for t, d in zip((query, key, value), dtypes)]
    reason = _fallback_reason(q, k, v, attention_mask, dropout, kwargs)
    if reason is not None:
        _warn_once(reason)
        sq, sk = query.shape[2], key.shape[2]
        if attention_mask is None and causal and sq > 1 and sq != sk:
            # HF's SDPA would read the missing mask top-left; ours means bottom-right.
            attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=causal, **kwargs)
    # One query sees every key either way; non-causal lets the CPU use torch's fused kernel for it.
    out = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          causal=causal and q.shape[2] > 1, softmax_scale=scaling)
    return out, None


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
          attention_mask=None, allow_is_causal_skip=True, **kwargs):
    """None when the mask is the bottom-right causal one fmcore's kernel applies by itself, else HF's
    boolean (B, 1, Sq, Sk) SDPA mask, never HF's None (which its SDPA function reads top-left)."""
    if (allow_is_causal_skip and mask_function is causal_mask_function
            and all(isinstance(x, (int, torch.SymInt)) for x in (q_offset, kv_offset))  # (tensors: a static cache)
            # the queries are the last keys (not in a static cache's prefill: its keys run to max_cache_len)
            and statically_known_true(q_offset + q_length == kv_offset + kv_length)
            and _no_padding(attention_mask, kv_length, kv_offset)):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kwargs)


def _no_padding(attention_mask: torch.Tensor | None, kv_length, kv_offset) -> bool:
    if attention_mask is None:
        return True
    # Reading the mask's values under torch.compile would break the graph (HF's SDPA mask does the same).
    if is_tracing(attention_mask) or attention_mask.shape[-1] < kv_offset + kv_length:
        return False
    return bool(attention_mask[:, kv_offset:kv_offset + kv_length].all())


def register_attention() -> str:
    """Make ``attn_implementation="fmcore"`` available to transformers (idempotent); returns the name."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


# ---- the modules apply_to patches (each a forward bound to one instance)


def _rms_norm_forward(self: LlamaRMSNorm, x: torch.Tensor) -> torch.Tensor:
    # HF returns weight * normed.to(x.dtype): an fp32 weight on a bf16 stream gives fp32.
    out_dtype = torch.promote_types(x.dtype, self.weight.dtype)
    return add_norm(x, None, self.weight, eps=self.variance_epsilon, kind="rms", out_dtype=out_dtype)[0]


def _layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return add_norm(x, None, self.weight, self.bias, eps=self.eps, kind="layer")[0]


def _swiglu_mlp_forward(self: LlamaMLP, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _gelu_mlp_forward(approximate: str):
    def forward(self: GPT2MLP, x: torch.Tensor) -> torch.Tensor:
        # Conv1D is x @ weight + bias, weight (in, out); the bias joins the GELU, its gradient summed there.
        h = bias_gelu(torch.matmul(x, self.c_fc.weight), self.c_fc.bias, approximate=approximate)
        return self.dropout(self.c_proj(h))

    return forward


# GPT-2's activation_function -> the GPT2MLP forward (a closure, not a partial: dynamo cannot bind those)
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
_GELU_MLP_FORWARD = {name: _gelu_mlp_forward(approximate) for name, approximate in _GELU.items()}


def _llama_attention_forward(self: LlamaAttention, hidden_states: torch.Tensor,
                             position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                             attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
    """LlamaAttention.forward with fmcore's RoPE, applied in the (B, S, H, D) layout of the projections."""
    input_shape = hidden_states.shape[:-1]
    shape = (*input_shape, -1, self.head_dim)
    q, k = self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attention(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                             scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


# ---- the lm head and its loss

# Which output class each supported model's forward returns, for the fused loss path that bypasses it.
_OUTPUTS = {LlamaForCausalLM: CausalLMOutputWithPast, GPT2LMHeadModel: CausalLMOutputWithCrossAttentions}


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
    # The arguments before labels are the base model's own, in the same order (Llama and GPT-2 alike).
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
_OURS = {_rms_norm_forward, _layer_norm_forward, _swiglu_mlp_forward, _llama_attention_forward,
         *_GELU_MLP_FORWARD.values(), *_FUSED_LOSS_FORWARD.values()}


# ---- apply_to


def apply_to(model: nn.Module, *, attention: bool = True, rope: bool = True, norm: bool = True, mlp: bool = True,
             loss: bool = True) -> nn.Module:
    """Swap fmcore's kernels into ``model`` (this instance only; other models of its class are untouched).

    Args:
        model: a ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` (anything else is refused by name; apply
            it before wrapping the model in peft, DDP or FSDP).
        attention: ``attn_implementation="fmcore"`` (see ``register_attention``).
        rope: fmcore's RoPE op on HF's cos/sin tables (Llama).
        norm: RMSNorm (Llama) / LayerNorm (GPT-2) by ``fmcore.ops.add_norm``.
        mlp: SwiGLU (Llama, hidden_act "silu") / bias + GELU (GPT-2, "gelu_new", "gelu_pytorch_tanh"
            or "gelu") by fmcore's fused activations.
        loss: with ``labels`` in training (``model.train()``), the lm head and HF's causal-LM loss by
            ``linear_cross_entropy``, which never holds the logits: the output's logits are None (a
            tuple output is (loss, cache, ...)). ``model(..., skip_logits=False)`` (or eval mode) keeps
            HF's path and its logits; ``skip_logits=True`` takes the fused path in eval mode too.
    Returns the model. Applying it again is harmless; a False flag leaves that part as it is.
    """
    if type(model) not in _OUTPUTS:
        names = ", ".join(c.__name__ for c in _OUTPUTS)
        raise TypeError(f"fmcore.hf.apply_to supports {names}, got {type(model).__name__}")
    llama = isinstance(model, LlamaForCausalLM)
    config = model.config
    if mlp:
        field = "hidden_act" if llama else "activation_function"
        act = getattr(config, field)
        if act not in (("silu",) if llama else _GELU):
            raise ValueError(f"fmcore.hf.apply_to: no fused MLP for the {field} {act!r} of this "
                             f"{type(model).__name__} (pass mlp=False)")
    patches = []  # (module, forward), checked before any is made
    for module in model.modules():
        if norm and isinstance(module, LlamaRMSNorm):
            patches.append((module, _rms_norm_forward))
        elif norm and not llama and isinstance(module, nn.LayerNorm) and module.weight is not None:
            patches.append((module, _layer_norm_forward))
        elif mlp and isinstance(module, LlamaMLP):
            patches.append((module, _swiglu_mlp_forward))
        elif mlp and isinstance(module, GPT2MLP):
            patches.append((module, _GELU_MLP_FORWARD[config.activation_function]))
        elif rope and isinstance(module, LlamaAttention):
            patches.append((module, _llama_attention_forward))
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
    if attention:
        register_attention()
        model.set_attn_implementation(NAME)
    return model
