"""fmcore.hf: fmcore's kernels patched into Hugging Face models give what the unpatched model gives.

Tiny models on the CPU. Every comparison of values is against the float64 unpatched model, allowing
at most about twice the error of transformers' own same-dtype result (tests/util.py)."""

import contextlib
import copy
import functools
import io
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from tests.util import assert_close_to_ref

transformers = pytest.importorskip("transformers", minversion="5.24")  # fmcore.hf.MIN_TRANSFORMERS
hf = pytest.importorskip("fmcore.hf")

V = 101  # odd vocab: no power-of-two chunking hides an edge


RMS_KINDS = ["llama", "mistral", "qwen2", "qwen3"]  # Llama's modules, copied into each family
KINDS = [*RMS_KINDS, "gpt2"]


def assert_same_generation(got, want) -> None:
    """generate(..., output_logits=True, return_dict_in_generate=True) results: the same tokens and logits
    (a tiny model's greedy tokens soon repeat: the logits tell)."""
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def rms_config(kind="llama", **kw):
    # GQA (4 query heads over 2 kv heads); head dim 16; intermediate 96 (not a multiple of the width);
    # biases on the attention projections (Mistral has none; Qwen2's are always on), so a dropped one
    # shows; no eos so generate runs all its steps. Mistral keeps its default sliding window of 4096
    # (longer than any sequence here: the kernel's case); Qwen3 adds q_norm and k_norm on the head dim.
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=128, attention_bias=True,
                tie_word_embeddings=False, rms_norm_eps=1e-5, eos_token_id=None, pad_token_id=0,
                attn_implementation="sdpa")
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[kind]
    return cls(**(base | kw))


def gpt2_config(**kw):
    # 3 heads of 16; dropout off so patched and unpatched see the same function; tied head (HF's default);
    # weights 10x HF's init, so that the MLP's pre-activations reach where erf and tanh GELU differ;
    # scores scaled by 1/layer too, so that a softmax scale left at 1/sqrt(D) shows
    base = dict(vocab_size=V, n_embd=48, n_layer=2, n_head=3, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, initializer_range=0.2, scale_attn_by_inverse_layer_idx=True, eos_token_id=None,
                pad_token_id=0, attn_implementation="sdpa")
    return transformers.GPT2Config(**(base | kw))


def build(kind, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(gpt2_config(**kw))
    else:
        model = transformers.AutoModelForCausalLM.from_config(rms_config(kind, **kw))
    with torch.no_grad():  # norm weights and biases away from their 1 / 0 init, so a dropped one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def patched(model, **flags):
    return hf.apply_to(copy.deepcopy(model), **flags)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(hf, "_warned", set())


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call that reached fmcore's flash attention through the interface: (Sq, Sk) of the batched
    kernel, ("varlen", cu_seqlens_q, cu_seqlens_k) of the varlen one, each followed by its window_size
    where it has one."""
    calls = []

    def window(kw):
        size = tuple(kw.get("window_size", (-1, -1)))
        return [] if size == (-1, -1) else [size]

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], *window(kw)))
        return flash_attention(q, k, v, **kw)

    def varlen_spy(q, k, v, cu_q, cu_k, *args, **kw):
        cu = [] if torch.compiler.is_compiling() else [cu_q.tolist(), cu_k.tolist()]
        calls.append(("varlen", *cu, *window(kw)))
        return flash_attention_varlen(q, k, v, cu_q, cu_k, *args, **kw)

    flash_attention, flash_attention_varlen = hf.flash_attention, hf.flash_attention_varlen
    monkeypatch.setattr(hf, "flash_attention", spy)
    monkeypatch.setattr(hf, "flash_attention_varlen", varlen_spy)
    return calls


def tokens(B=2, S=37, seed=1):  # 37: not a power of two
    return torch.randint(1, V, (B, S), generator=torch.Generator().manual_seed(seed))


def padding_mask(x, valid, side):
    """The attention mask of x's rows holding these numbers of tokens, padded on the left or right."""
    pos, n = torch.arange(x.shape[1]), torch.tensor(valid)[:, None]
    return (pos < n if side == "right" else pos >= x.shape[1] - n).long()


def labels_of(x):
    labels = x.clone()
    labels[0, :5] = -100  # a prompt the loss ignores
    labels[1, -3:] = -100
    return labels


def loss_and_grads(model, x, labels, **kw):
    model.train()
    model.zero_grad()
    out = model(input_ids=x, labels=labels, **kw)
    out.loss.backward()
    return out, {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}  # (torch.compile's)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_loss_and_every_gradient_match_transformers(kind, dtype, kernel_calls):
    base = build(kind, dtype)
    ref = copy.deepcopy(base).double()  # the same (rounded) weights in float64
    fm = patched(base)
    x = tokens()
    labels = labels_of(x)
    with torch.no_grad():
        want = ref.eval()(x).logits
        assert_close_to_ref(fm.eval()(x).logits, want, base.eval()(x).logits, "logits")
    assert kernel_calls and all(c == (37, 37) for c in kernel_calls)

    out_ref, g_ref = loss_and_grads(ref, x, labels)
    out_hf, g_hf = loss_and_grads(base, x, labels)
    out_fm, g_fm = loss_and_grads(fm, x, labels)
    assert out_fm.logits is None  # the fused head: no logits were made
    assert out_fm.loss.dtype == out_hf.loss.dtype == torch.float32  # HF upcasts the logits for its loss
    # The loss is fp32 whatever the model's dtype: the floor is the model's (a mean of bf16 logits' losses).
    assert_close_to_ref(out_fm.loss, out_ref.loss, out_hf.loss, "loss", floor_dtype=dtype)
    assert out_fm.loss.item() != out_fm.loss.bfloat16().item()  # not a bf16 rounding (the op's own dtype)
    assert g_fm.keys() == g_ref.keys()
    for name in g_ref:
        assert_close_to_ref(g_fm[name], g_ref[name], g_hf[name], name)


@pytest.mark.parametrize("kind, rope", [("llama", True), ("llama", False), ("qwen3", True), ("gpt2", True)])
def test_mixed_precision_under_autocast_matches_transformers(kind, rope, kernel_calls):
    # fp32 weights, bf16 matmuls: what most training runs do. The kernel must get autocast's dtype
    # (HF's own RoPE, rope=False, multiplies bf16 q and k by fp32 tables: fp32 q and k beside a bf16 v;
    # Qwen3's fp32 q_norm and k_norm weights make fp32 q and k too). The residual stream stays fp32.
    base = build(kind)
    ref = copy.deepcopy(base).double()
    fm = patched(base, rope=rope)
    x = tokens()
    labels = labels_of(x)
    out_ref, g_ref = loss_and_grads(ref, x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_hf, g_hf = loss_and_grads(base, x, labels)
        out_fm, g_fm = loss_and_grads(fm, x, labels)
    assert kernel_calls
    # fp32 results of bf16 computations: bf16's floor
    assert_close_to_ref(out_fm.loss, out_ref.loss, out_hf.loss, "loss", floor_dtype=torch.bfloat16)
    for name in g_ref:
        assert_close_to_ref(g_fm[name], g_ref[name], g_hf[name], name, floor_dtype=torch.bfloat16)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.bfloat16)])
def test_rms_norm_returns_transformers_dtype(x_dtype, w_dtype):
    # LlamaRMSNorm returns weight * normed.to(x.dtype): fp32 when either is (norms kept in fp32 in a
    # bf16 model, as _keep_in_fp32_modules does), whatever add_norm's default would be.
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    norm = norm.to(w_dtype)
    x = torch.randn(2, 5, 64, dtype=x_dtype)
    want = norm(x)
    norm.forward = types.MethodType(hf._rms_norm_forward, norm)
    got = norm(x)
    assert got.dtype == want.dtype
    ref = norm.weight.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert_close_to_ref(got, ref, want, "rms_norm")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradient_checkpointing_recomputes_the_fused_layers_and_gives_the_same_gradients(kind):
    # HF checkpoints in the forward its layer classes get when defined; the fused layer forward bound to
    # the instance must checkpoint itself, or memory silently grows back (the gradients alone cannot tell).
    base = build(kind)
    fm = patched(base)
    x = tokens()
    labels = labels_of(x)
    want, g_want = loss_and_grads(fm, x, labels)
    layers = fm.model.layers if kind != "gpt2" else fm.transformer.h
    attention_calls = []
    for layer in layers:
        (layer.self_attn if kind != "gpt2" else layer.attn).register_forward_hook(lambda *_: attention_calls.append(1))
    fm.activation_checkpointing_enable()
    got, g_got = loss_and_grads(fm, x, labels)
    assert len(attention_calls) == 2 * len(layers)  # the forward, then its replay in the backward
    torch.testing.assert_close(got.loss, want.loss)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name])


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_hidden_states_are_each_layers_output(kind):
    # HF records each decoder layer's output: the fused layers return the residual stream as before.
    base = build(kind).eval()
    fm = patched(base).eval()
    x = tokens()
    with torch.no_grad():
        want = base(x, output_hidden_states=True).hidden_states
        got = fm(x, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_fallback_keeps_the_bottom_right_alignment(monkeypatch):
    # Without a mask, 3 queries against 7 keys are the last 3 positions (HF's SDPA alone would read
    # that top-left): the fallback must compute what the kernel does.
    q = torch.randn(2, 4, 3, 16)
    k, v = torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    want, _ = hf.attention_forward(module, q, k, v, None)
    monkeypatch.setattr(hf, "_sdpa_fallback_reason", lambda *a: "a reason")
    with pytest.warns(UserWarning, match="a reason"):
        got, _ = hf.attention_forward(module, q, k, v, None)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trainer_loss_kwargs_match_transformers(kind):
    # The Trainer passes num_items_in_batch (a sum over the batch divided by the tokens of the whole
    # accumulated step); collators of packed or pre-shifted data pass shift_labels.
    base = build(kind)
    fm = patched(base)
    x = tokens()
    labels = labels_of(x)
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    shifted[1, 10:14] = -100
    for kw in ({"num_items_in_batch": torch.tensor(123)}, {"shift_labels": shifted}, {"num_items_in_batch": 50}):
        want, g_want = loss_and_grads(base, x, labels, **kw)
        got, g_got = loss_and_grads(fm, x, labels, **kw)
        torch.testing.assert_close(got.loss, want.loss)
        for name in g_want:
            torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-4, atol=1e-5)


def test_logits_are_kept_when_asked_for():
    base = build("llama")
    fm = patched(base)
    x = tokens()
    labels = labels_of(x)
    want = base.train()(x, labels=labels)
    asked = fm.train()(x, labels=labels, skip_logits=False)
    evaluated = fm.eval()(x, labels=labels)  # Trainer.evaluate's compute_metrics needs the logits
    for out in (asked, evaluated):
        torch.testing.assert_close(out.logits, want.logits)
        torch.testing.assert_close(out.loss, want.loss)
    as_tuple = fm.train()(x, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], want.loss)  # (loss,): the logits are None, to_tuple drops them


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_with_the_kv_cache_matches(kind, kernel_calls):
    base = build(kind).eval()
    fm = patched(base).eval()
    x = tokens(S=9)
    args = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want, got = base.generate(x, **args), fm.generate(x, **args)
    assert_same_generation(got, want)
    # the prefill, then one query against the cache each step, all on fmcore's kernel
    assert (9, 9) in kernel_calls and (1, 20) in kernel_calls


@pytest.mark.parametrize("padded", [False, True])
def test_a_chunk_after_a_cache_is_bottom_right_causal(padded, kernel_calls):
    # 6 new queries against 10 cached keys + their own: query i sees keys <= 10 + i (FlashAttention's
    # bottom-right alignment, what HF's causal mask is there). Top-left would hide most of the cache.
    # Padded: the second row's 3 first tokens are padding, its 6 queries see 7 + i valid keys.
    base = build("llama").eval()
    fm = patched(base).eval()
    x = tokens(S=16)
    mask = padding_mask(x, [16, 13], "left") if padded else torch.ones_like(x)
    with torch.no_grad():
        outs = []
        for model in (base, fm):
            cache = model(x[:, :10], attention_mask=mask[:, :10], use_cache=True).cache
            outs.append(model(x[:, 10:], attention_mask=mask, cache=cache, use_cache=True).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    # not a fallback with a materialized mask
    want = ("varlen", [0, 6, 6, 6, 12, 12, 12], [0, 16, 16, 16, 29, 29, 32]) if padded else (6, 16)
    assert want in kernel_calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind, side", [("llama", "left"), ("mistral", "right"), ("qwen3", "left"), ("gpt2", "right")])
def test_a_padded_batch_runs_the_varlen_kernel_and_matches(kind, side, dtype, kernel_calls):
    # Rows of 37, 30 and 1 tokens: a full row, a padded one, one padded down to a single token. Each row
    # is three documents of the varlen kernel: its tokens (moved first), its padded queries (no key),
    # its padded keys (no query). Outputs are compared where they are tokens, the loss ignores padding.
    base = build(kind, dtype)
    ref = copy.deepcopy(base).double()
    fm = patched(base)
    x = tokens(B=3)
    mask = padding_mask(x, [37, 30, 1], side)
    valid = mask.bool()
    labels = labels_of(x).masked_fill(~valid, -100)
    with torch.no_grad():
        want = ref.eval()(x, attention_mask=mask).logits[valid]
        got, hf_out = fm.eval()(x, attention_mask=mask).logits, base.eval()(x, attention_mask=mask).logits
        assert_close_to_ref(got[valid], want, hf_out[valid], "logits")
    # per row: (tokens, padded queries, nothing) / (tokens, nothing, padded keys), the same either side
    cu_q, cu_k = [0, 37, 37, 37, 67, 74, 74, 75, 111, 111], [0, 37, 37, 37, 67, 67, 74, 75, 75, 111]
    assert kernel_calls and all(c == ("varlen", cu_q, cu_k) for c in kernel_calls)

    out_ref, g_ref = loss_and_grads(ref, x, labels, attention_mask=mask)
    out_hf, g_hf = loss_and_grads(base, x, labels, attention_mask=mask)
    out_fm, g_fm = loss_and_grads(fm, x, labels, attention_mask=mask)
    assert_close_to_ref(out_fm.loss, out_ref.loss, out_hf.loss, "loss", floor_dtype=dtype)
    for name in g_ref:
        assert_close_to_ref(g_fm[name], g_ref[name], g_hf[name], name)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_generate_from_a_left_padded_batch_matches(kind, kernel_calls):
    base = build(kind).eval()
    fm = patched(base).eval()
    x = tokens(B=3, S=9)
    mask = padding_mask(x, [9, 5, 1], "left")
    args = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
                return_dict_in_generate=True)
    want, got = base.generate(x, **args), fm.generate(x, **args)
    assert_same_generation(got, want)
    # the prefill, then each step's query of each row against its cached tokens, on the varlen kernel
    assert all(c[0] == "varlen" for c in kernel_calls) and len(kernel_calls) == 8 * 2
    assert kernel_calls[0][1] == [0, 9, 9, 9, 14, 18, 18, 19, 27, 27]
    assert kernel_calls[-1][1:] == ([0, 1, 1, 1, 2, 2, 2, 3, 3, 3], [0, 16, 16, 16, 28, 28, 32, 40, 40, 48])


def packed_batch(layout):
    """Documents packed by position_ids restarting at 0, with their cu_seqlens: DataCollatorWithFlattening's
    one row of 13, 1 and 23 tokens (a document of one token), or two rows, the second of two documents."""
    if layout == "flattened":
        docs = [{"input_ids": tokens(B=1, S=n, seed=n)[0].tolist()} for n in (13, 1, 23)]
        batch = transformers.DataCollatorWithFlattening()(docs)
        return batch, [0, 13, 14, 37]
    x = tokens()
    position_ids = torch.arange(37).repeat(2, 1)
    position_ids[1, 10:] -= 10
    return dict(input_ids=x, labels=labels_of(x), position_ids=position_ids), [0, 37, 47, 74]


@pytest.mark.parametrize("kind, layout", [("llama", "flattened"), ("qwen3", "rows"), ("gpt2", "flattened"),
                                          ("gpt2", "rows")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_sequences_run_the_varlen_kernel_per_document(kind, layout, dtype, kernel_calls):
    # HF masks attention to each document (no attention mask, no cache: use_cache=False); so must we.
    base = build(kind, dtype)
    ref = copy.deepcopy(base).double()
    fm = patched(base)
    batch, cu = packed_batch(layout)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = ref.eval()(**inputs, use_cache=False).logits
        got, hf_out = fm.eval()(**inputs, use_cache=False).logits, base.eval()(**inputs, use_cache=False).logits
        assert_close_to_ref(got, want, hf_out, "logits")
    assert kernel_calls == [("varlen", cu, cu)] * 2

    x, labels = batch["input_ids"], batch["labels"]
    kw = dict(position_ids=batch["position_ids"], use_cache=False)
    out_ref, g_ref = loss_and_grads(ref, x, labels, **kw)
    out_hf, g_hf = loss_and_grads(base, x, labels, **kw)
    out_fm, g_fm = loss_and_grads(fm, x, labels, **kw)
    assert_close_to_ref(out_fm.loss, out_ref.loss, out_hf.loss, "loss", floor_dtype=dtype)
    for name in g_ref:
        assert_close_to_ref(g_fm[name], g_ref[name], g_hf[name], name)


@pytest.mark.parametrize("batch", ["padded", "packed", "generate"])
def test_the_fallback_masks_what_the_varlen_kernel_would(batch, monkeypatch):
    # What the kernel cannot take (dropout, a dtype or head dim CUDA lacks) runs HF's SDPA: the mask
    # function's padding mask or cu_seqlens must become the 4-D mask of the same attention (in decoding
    # too, the queries the last keys).
    fm = patched(build("llama")).eval()
    if batch == "generate":
        x = tokens(B=3, S=9)
        args = dict(attention_mask=padding_mask(x, [9, 5, 1], "left"), max_new_tokens=6, do_sample=False,
                    output_logits=True, return_dict_in_generate=True)
        want = fm.generate(x, **args)
        monkeypatch.setattr(hf, "_sdpa_fallback_reason", lambda *a: "a reason")
        with pytest.warns(UserWarning, match="a reason"):
            got = fm.generate(x, **args)
        assert_same_generation(got, want)
        return
    if batch == "padded":
        x = tokens(B=3)
        mask = padding_mask(x, [37, 30, 1], "left")
        inputs, valid = dict(input_ids=x, attention_mask=mask), mask.bool()
    else:
        inputs = packed_batch("rows")[0]
        del inputs["labels"]
        inputs["use_cache"], valid = False, torch.ones(2, 37, dtype=torch.bool)
    with torch.no_grad():
        want = fm(**inputs).logits
        monkeypatch.setattr(hf, "_sdpa_fallback_reason", lambda *a: "a reason")
        with pytest.warns(UserWarning, match="a reason"):
            got = fm(**inputs).logits
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-5)


def test_a_2d_mask_not_made_by_the_mask_function_is_refused():
    # A tokenizer's 0/1 mask handed straight to the attention function would be misread: refused by name.
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    module = torch.nn.Module()
    module.is_causal = True
    with pytest.raises(ValueError, match="a bool .* padding mask, got torch.int64"):
        hf.attention_forward(module, q, k, v, torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, Sk\) = \(2, 5\) padding mask, got torch.bool of shape \(2, 4\)"):
        hf.attention_forward(module, q, k, v, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="int32 cu_seqlens"):
        hf.attention_forward(module, q, k, v, torch.tensor([0, 5, 10]))


@pytest.mark.parametrize("name", ["s_aux", "softcap"])
def test_what_neither_the_kernel_nor_sdpa_computes_is_refused(name):
    # gpt-oss's attention sinks (s_aux) fell back to transformers' SDPA, which ignores them: its logits were
    # silently wrong. Gemma 2's softcap made that SDPA raise, after a warning that it would run.
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    module = torch.nn.Module()
    module.is_causal = True
    with pytest.raises(ValueError, match=f"{name} .* attn_implementation='eager'"):
        hf.attention_forward(module, q, k, v, None, **{name: torch.zeros(4) if name == "s_aux" else 50.0})


def test_a_layout_is_reused_only_for_the_same_mask_and_queries():
    # Every layer of a forward passes the same mask tensor, whose layout is made once: the same mask with
    # fewer queries, or changed in place, must not reuse it.
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    k, v = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    for sq, change in ((6, False), (3, False), (3, True)):
        if change:
            mask[0, :3] = False
        q = torch.randn(2, 4, sq, 16)
        got, _ = hf.attention_forward(module, q, k, v, mask)
        want, _ = hf.sdpa_attention_forward(module, q, k, v, hf._sdpa_mask(mask, q, k, True), is_causal=True)
        valid = mask[:, -sq:]
        torch.testing.assert_close(got[valid], want[valid])


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_the_patched_attention_passes_the_interface_what_transformers_does(kind):
    # FlashAttention-2 (not on the CPU) reads the sliding window from the interface's keywords: Mistral's
    # from its config, Qwen2's per layer (None on its full-attention layer 0).
    seen = []

    def spy(module, *args, **kwargs):
        seen.append({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
        return hf.sdpa_attention_forward(module, *args, **kwargs)

    transformers.AttentionInterface.register("fmcore_test_spy", spy)
    transformers.masking_utils.AttentionMaskInterface.register("fmcore_test_spy", transformers.masking_utils.sdpa_mask)
    kw = dict(use_sliding_window=True, max_window_layers=1) if kind == "qwen2" else {}
    base = build(kind, sliding_window=50, attn_implementation="fmcore_test_spy", **kw).eval()
    fm = patched(base, attention=False)
    with torch.no_grad():
        base(tokens())
        fm(tokens())
    assert seen[:2] == seen[2:] and seen[1]["sliding_window"] == 50


def sliding(kind, window=5):
    """Model keywords for a sliding window: Mistral's on every layer, Qwen's on the layers from
    max_window_layers on (here layer 1; layer 0 attends to everything)."""
    qwen = dict(use_sliding_window=True, max_window_layers=1) if kind.startswith("qwen") else {}
    return dict(sliding_window=window, **qwen)


def layer_windows(kind, window=5):
    """The kernel's window_size in each of the 2 layers, as kernel_calls records it: HF's window of W shows a
    query itself and the W - 1 keys before it."""
    return [(window - 1, 0)] * 2 if kind == "mistral" else [None, (window - 1, 0)]


def with_window(call, window):
    return call if window is None else (*call, window)


@contextlib.contextmanager
def no_fallback():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fmcore.hf attention")
        yield


@pytest.mark.parametrize("kind, window, kernel_window", [("mistral", 37, None), ("mistral", 36, (35, 0)),
                                                         ("qwen2", 36, (35, 0))])
def test_a_sliding_window_as_long_as_the_keys_needs_none(kind, window, kernel_window, kernel_calls):
    # Of 37 keys the farthest is 36 back: a window of 37 hides nothing (the plain causal kernel), one of 36
    # hides it from the last query (window_size (35, 0)).
    base = build(kind, **sliding(kind, window)).eval()
    fm = patched(base).eval()
    x = tokens()
    with no_fallback(), torch.no_grad():
        got = fm(x).logits
    torch.testing.assert_close(got, base(x).logits, rtol=1e-4, atol=1e-5)
    windows = [kernel_window] * 2 if kind == "mistral" else [None, kernel_window]
    assert kernel_calls == [with_window((37, 37), w) for w in windows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", ["plain", "padded", "packed"])
@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_a_sliding_window_runs_the_windowed_kernel_and_matches(kind, batch, dtype, kernel_calls):
    # A window of 5 over 37 tokens (rows of 37, 30 and 1 tokens padded; documents of 37, 10 and 27): logits,
    # loss and every gradient as the float64 model's, on the kernel with window_size (4, 0) (Qwen2's layer 0
    # without), no layer falling back.
    base = build(kind, dtype, **sliding(kind))
    ref = copy.deepcopy(base).double()
    fm = patched(base)
    if batch == "packed":
        inputs, cu = packed_batch("rows")
        labels = inputs.pop("labels")
        inputs["use_cache"] = False
        valid, calls = torch.ones(2, 37, dtype=torch.bool), ("varlen", cu, cu)
    else:
        x = tokens(B=3) if batch == "padded" else tokens()
        mask = padding_mask(x, [37, 30, 1], "left" if kind != "mistral" else "right") if batch == "padded" \
            else torch.ones_like(x)
        inputs, valid = dict(input_ids=x, attention_mask=mask), mask.bool()
        labels = labels_of(x).masked_fill(~valid, -100)
        calls = (37, 37) if batch == "plain" else \
            ("varlen", [0, 37, 37, 37, 67, 74, 74, 75, 111, 111], [0, 37, 37, 37, 67, 67, 74, 75, 75, 111])
    with torch.no_grad():
        want = ref.eval()(**inputs).logits[valid]
        with no_fallback():
            got = fm.eval()(**inputs).logits[valid]
        assert_close_to_ref(got, want, base.eval()(**inputs).logits[valid], "logits")
    assert kernel_calls == [with_window(calls, w) for w in layer_windows(kind)]

    x = inputs.pop("input_ids")
    out_ref, g_ref = loss_and_grads(ref, x, labels, **inputs)
    out_hf, g_hf = loss_and_grads(base, x, labels, **inputs)
    with no_fallback():
        out_fm, g_fm = loss_and_grads(fm, x, labels, **inputs)
    assert_close_to_ref(out_fm.loss, out_ref.loss, out_hf.loss, "loss", floor_dtype=dtype)
    for name in g_ref:
        assert_close_to_ref(g_fm[name], g_ref[name], g_hf[name], name)


def test_a_sliding_window_over_padding_between_tokens_is_masked_not_compacted(kernel_calls):
    # HF's window counts positions, padded ones too: the varlen layout, which moves the padding out, would
    # show a query after the gap keys the window does not reach. Its sliding layer runs SDPA (Qwen2's full
    # layer 0, where the gap does not matter, keeps the varlen kernel).
    base = build("qwen2", **sliding("qwen2")).eval()
    fm = patched(base).eval()
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, 12:15] = 0
    valid = mask.bool()
    with torch.no_grad(), pytest.warns(UserWarning, match="a sliding window over padding between tokens"):
        got = fm(x, attention_mask=mask).logits
    torch.testing.assert_close(got[valid], base(x, attention_mask=mask).logits[valid], rtol=1e-4, atol=1e-5)
    assert kernel_calls == [("varlen", [0, 37, 37, 37, 71, 74, 74], [0, 37, 37, 37, 71, 71, 74])]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_greedy_generate_past_a_sliding_window_matches(kind, padded, kernel_calls):
    # 9 prompt tokens and 12 new ones with a window of 5. HF's dynamic cache keeps the last 4 keys of a
    # sliding layer: each step's query then sees all of its 5 keys, a plain causal call; Qwen2's full
    # layer keeps them all.
    base = build(kind, **sliding(kind)).eval()
    fm = patched(base).eval()
    x = tokens(B=3, S=9)
    mask = padding_mask(x, [9, 5, 1], "left") if padded else torch.ones_like(x)
    args = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True,
                return_dict_in_generate=True)
    want = base.generate(x, **args)
    with no_fallback():
        got = fm.generate(x, **args)
    assert_same_generation(got, want)
    prefill = ("varlen", [0, 9, 9, 9, 14, 18, 18, 19, 27, 27], [0, 9, 9, 9, 14, 14, 18, 19, 19, 27]) if padded \
        else (9, 9)
    assert kernel_calls[:2] == [with_window(prefill, w) for w in layer_windows(kind)]
    # the last step: Qwen2's full layer 0 against its 20 keys (rows of 20, 16 and 12 tokens), the sliding
    # layers against their 5 (all tokens by then)
    full_layer = ("varlen", [0, 1, 1, 1, 2, 2, 2, 3, 3, 3], [0, 20, 20, 20, 36, 36, 40, 52, 52, 60]) if padded \
        else (1, 20)
    assert kernel_calls[-2:] == [full_layer if kind == "qwen2" else (1, 5), (1, 5)]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cache", ["sliding", "full"])
def test_a_chunk_after_a_cache_sees_the_window_of_its_last_keys(cache, padded, kernel_calls):
    # 6 new queries after 10 cached tokens, a window of 5. HF's sliding cache layer holds only the last 4
    # keys (the chunk sees 4 + 6), a cache made without the config all 10: either way the queries are the
    # last keys, and the window aligned to them (bottom-right) must be HF's. Padded: the second row's 8 first
    # tokens are padding, 2 of them among the sliding layer's keys.
    base = build("mistral", **sliding("mistral")).eval()
    fm = patched(base).eval()
    x = tokens(S=16)
    mask = padding_mask(x, [16, 8], "left") if padded else torch.ones_like(x)
    with torch.no_grad():
        outs = []
        for model in (base, fm):
            kept = transformers.DynamicCache() if cache == "full" else None  # (None: the model makes one of its config)
            prefill = model(x[:, :10], attention_mask=mask[:, :10], cache=kept, use_cache=True).cache
            with no_fallback():
                outs.append(model(x[:, 10:], attention_mask=mask, cache=prefill, use_cache=True).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    keys = 10 if cache == "sliding" else 16
    chunk = (6, keys) if not padded else \
        ("varlen", [0, 6, 6, 6, 12, 12, 12], [0, keys, keys, keys, 2 * keys - 2, 2 * keys - 2, 2 * keys]) \
        if cache == "sliding" else ("varlen", [0, 6, 6, 6, 12, 12, 12], [0, 16, 16, 16, 24, 24, 32])
    assert kernel_calls[-2:] == [with_window(chunk, (4, 0))] * 2


def test_the_sliding_window_keyword_must_agree_with_the_mask(kernel_calls):
    # The mask function decides (it is the attention HF's SDPA computes); HF's FlashAttention path reads the
    # layer's sliding_window keyword instead. Where they disagree, the mask's attention runs on SDPA, warned.
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q, k, v = torch.randn(2, 4, 12, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    windowed = hf.sdpa_attention_forward(module, q, k, v, hf.sdpa_mask(
        batch_size=2, q_length=12, kv_length=12, mask_function=hf.sliding_window_causal_mask_function(5),
        allow_is_causal_skip=False))[0]
    causal = hf.sdpa_attention_forward(module, q, k, v, None, is_causal=True)[0]
    assert (windowed - causal).abs().max() > 0.1
    with no_fallback():  # agreeing, or a keyword window that hides nothing of the 12 keys
        torch.testing.assert_close(hf.attention_forward(module, q, k, v, hf._Windowed(None, 5), sliding_window=5)[0],
                                   windowed)
        torch.testing.assert_close(hf.attention_forward(module, q, k, v, None, sliding_window=12)[0], causal)
    assert kernel_calls == [(12, 12, (4, 0)), (12, 12)]
    for mask, keyword, want in ((hf._Windowed(None, 5), None, windowed), (None, 5, causal),
                                (hf._Windowed(None, 5), 4, windowed)):
        hf._warned.clear()
        with pytest.warns(UserWarning, match=f"sliding_window={keyword} disagrees"):
            got, _ = hf.attention_forward(module, q, k, v, mask, sliding_window=keyword)
        torch.testing.assert_close(got, want)
    assert len(kernel_calls) == 2


def test_a_disagreeing_sliding_window_keyword_warns_once_as_the_keys_grow():
    # Decoding adds a key a step: the warning, "shown once per reason", must not come back at every step.
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for sk in (12, 13, 14):
            q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, sk, 16), torch.randn(1, 2, sk, 16)
            hf.attention_forward(module, q, k, v, None, sliding_window=5)
    assert len([w for w in caught if "sliding_window=5 disagrees" in str(w.message)]) == 1


@pytest.mark.parametrize("kind, padded", [("llama", False), ("mistral", False), ("mistral", True)])
def test_a_static_cache_prefill_is_masked_not_read_bottom_right(kind, padded, kernel_calls):
    # A static cache hands attention all its max_cache_len keys, the unwritten ones zeros; HF's SDPA
    # convention leaves such a prefill unmasked (top-left causal hides them). fmcore's bottom-right
    # alignment would attend to the zeros, so the mask function must build the mask there. Mistral's
    # sliding window of 5 keeps its keys in a rolling buffer of 5, to which the prefill's 7 tokens are all
    # handed: a windowed kernel call (generate makes that mask before the forward and passes it back in).
    base = build(kind, **(sliding(kind) if kind == "mistral" else {})).eval()
    fm = patched(base).eval()
    x = tokens(B=3, S=7)
    args = dict(max_new_tokens=5, do_sample=False, cache_implementation="static", output_logits=True,
                return_dict_in_generate=True, attention_mask=padding_mask(x, [7, 4, 1], "left") if padded else None)
    want = base.generate(x, **args)
    with pytest.warns(UserWarning, match="an attention mask"):
        got = fm.generate(x, **args)
    assert_same_generation(got, want)
    # (HF masks every decode step against a static cache too)
    prefill = ("varlen", [0, 7, 7, 7, 11, 14, 14, 15, 21, 21], [0, 7, 7, 7, 11, 11, 14, 15, 15, 21]) if padded \
        else (7, 7)
    assert kernel_calls == ([(*prefill, (4, 0))] * 2 if kind == "mistral" else [])


@pytest.mark.parametrize("kind, batch", [*[(kind, "plain") for kind in KINDS], ("llama", "padded"),
                                         ("gpt2", "padded"), ("qwen2", "packed"), ("mistral", "windowed"),
                                         ("qwen2", "windowed padded")])
def test_compiles_with_fullgraph(kind, batch, kernel_calls):
    # HF marks these models _can_compile_fullgraph; the patched forwards must not break the graph. A padded
    # batch takes the varlen kernel in the graph too (static shapes); a packed one HF's SDPA, as HF cannot
    # tell under torch.compile whether a batch is packed (neither can we: its documents are values). A
    # sliding window of 5 runs the windowed kernel, except over an attention mask (Qwen2's sliding layer 1),
    # which cannot be told free of padding between tokens without reading it: HF's SDPA there.
    base = build(kind, **(sliding(kind) if "windowed" in batch else {}))
    fm = patched(base)
    x = tokens(B=3, S=16)
    labels = labels_of(x)
    kw = {}
    if batch.endswith("padded"):  # (use_cache=False: a mask keeps HF from marking the batch packed)
        kw = dict(attention_mask=padding_mask(x, [16, 11, 1], "left"), use_cache=False)
        labels = labels.masked_fill(kw["attention_mask"] == 0, -100)
    if batch == "packed":
        kw = dict(position_ids=torch.cat([torch.arange(7), torch.arange(9)]).repeat(3, 1), use_cache=False)
    want, g_want = loss_and_grads(fm, x, labels, **kw)
    kernel_calls.clear()
    torch._dynamo.reset()  # (each case compiles the shared layer forwards again: past dynamo's recompile limit)
    compiled = torch.compile(fm, fullgraph=True, backend="aot_eager")
    got, g_got = loss_and_grads(compiled, x, labels, **kw)
    expected = {"plain": [(16, 16)] * 2, "padded": [("varlen",)] * 2, "packed": [],
                "windowed": [(16, 16, (4, 0))] * 2, "windowed padded": [("varlen",)]}[batch]
    if not hf._TRACES_CLOSURES and kind == "mistral":  # (its masks are sliding-window ones: SDPA there)
        expected = []
    assert kernel_calls == expected
    torch.testing.assert_close(got.loss, want.loss)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_an_fmcore_model_exported_reloads_and_patches(tmp_path, arch):
    from fmcore.train import models
    from fmcore.train.config import ModelConfig
    from fmcore.train.export import export_hf

    cfg = models.resolve(ModelConfig(arch=arch, dim=64, n_layers=2, n_heads=4, n_kv_heads=2 if arch == "llama" else 0,
                                     max_seq_len=64, ops="fmcore"), vocab_size=V)
    model = models.build_model(cfg, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = tokens(S=24)
    y = torch.cat([x[:, 1:], torch.full((2, 1), -100)], 1)
    for _ in range(3):  # trained a little, so the weights are not the init's
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    export_hf(model, cfg, tmp_path)
    reloaded = hf.apply_to(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x).logits, model.eval()(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(reloaded.train()(x, labels=x).loss, model.train()(x, y), rtol=1e-4, atol=1e-5)


def test_only_this_instance_is_patched():
    base = build("llama")
    fm = patched(base)
    assert fm.config._attn_implementation == "fmcore" and base.config._attn_implementation == "sdpa"
    assert "forward" not in vars(base) and all("forward" not in vars(m) for m in base.modules())
    assert "forward" in vars(fm.model.norm) and "forward" in vars(fm.model.layers[0].mlp)
    hf.apply_to(fm)  # again: harmless
    assert fm.forward.__func__ is hf._FUSED_LOSS_FORWARD[type(fm)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_deepcopy_of_a_patched_model_runs_its_own_weights(kind):
    # TRL's reference model, an EMA copy: a forward closed over the original model would run its weights.
    base = build(kind)
    fm = hf.apply_to(copy.deepcopy(base))
    clone, want = copy.deepcopy(fm), copy.deepcopy(base)
    with torch.no_grad():
        for a, b in zip(clone.parameters(), want.parameters()):
            a.mul_(1.5)
            b.mul_(1.5)
    x = tokens()
    labels = labels_of(x)
    torch.testing.assert_close(clone.train()(x, labels=labels).loss, want.train()(x, labels=labels).loss)
    torch.testing.assert_close(fm.train()(x, labels=labels).loss, base.train()(x, labels=labels).loss)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_pickled_patched_model_loads_patched(kind, monkeypatch):
    # torch.save(model) pickles the bound forwards: a bound method pickles as getattr(module, its
    # function's name), and torch.load raised AttributeError (no attribute '_llama_attention_forward').
    fm = patched(build(kind))
    buf = io.BytesIO()
    torch.save(fm, buf)
    buf.seek(0)
    # As in a new process, where only the load imports fmcore.hf: "fmcore" is no attention implementation yet.
    monkeypatch.delitem(transformers.AttentionInterface._global_mapping, hf.NAME)
    monkeypatch.delitem(transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, hf.NAME)
    loaded = torch.load(buf, weights_only=False)
    for a, b in zip(fm.modules(), loaded.modules()):
        if "forward" in vars(a):
            assert b.forward.__func__ is a.forward.__func__ and b.forward.__self__ is b
    x = tokens()
    labels = labels_of(x)
    out = loaded.train()(x, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, fm.train()(x, labels=labels).loss)


def _hooked_forward(module, *args, **kwargs):
    return module._old_forward(*args, **kwargs)


def test_a_patched_model_wrapped_afterwards_still_pickles():
    # accelerate's hooks, added after apply_to, keep our forward as _old_forward and put theirs in forward.
    fm = patched(build("llama"))
    mlp = fm.model.layers[0].mlp
    mlp._old_forward, mlp.forward = mlp.forward, functools.partial(_hooked_forward, mlp)
    buf = io.BytesIO()
    torch.save(fm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.model.layers[0].mlp._old_forward.__self__ is loaded.model.layers[0].mlp
    x = tokens()
    torch.testing.assert_close(loaded.eval()(x).logits, fm.eval()(x).logits)


class _LoraLike(torch.nn.Module):
    """What peft's LoRA layers look like to the module holding them: the base layer's weight and bias as
    attributes, the adapter's term added in forward."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base_layer = base
        self.lora_a = torch.nn.Linear(base.weight.shape[0], rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, base.weight.shape[1], bias=False)

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x):
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


def test_an_adapter_added_after_apply_to_is_not_dropped():
    # apply_to comes before peft (its docstring): GPT-2's patched MLP read c_fc.weight, which a LoRA layer
    # shows as its base layer's, so the adapter dropped out of the loss and got no gradient.
    base = build("gpt2")
    fm = patched(base)
    for model in (base, fm):
        torch.manual_seed(1)
        model.transformer.h[0].mlp.c_fc = _LoraLike(model.transformer.h[0].mlp.c_fc)
    x = tokens()
    labels = labels_of(x)
    got, want = fm.train()(x, labels=labels).loss, base.train()(x, labels=labels).loss
    torch.testing.assert_close(got, want)
    got.backward()
    assert fm.transformer.h[0].mlp.c_fc.lora_b.weight.grad is not None


class _NormTuningLike(torch.nn.Module):
    """What peft's LN tuning looks like to the decoder layer holding the norm: the base norm's weight and bias
    as attributes (no eps), a trained copy in forward."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.tuned = copy.deepcopy(base)
        with torch.no_grad():
            self.tuned.weight.mul_(1.5)

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x):
        return self.tuned(x)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_norm_wrapped_after_apply_to_runs_its_forward(kind):
    # The patched decoder layers read the norm after attention's weight (and eps) to fuse it with the add.
    base = build(kind)
    fm = patched(base)
    for model in (base, fm):
        layer = model.model.layers[0] if kind == "llama" else model.transformer.h[0]
        name = "post_attention_layernorm" if kind == "llama" else "ln_2"
        setattr(layer, name, _NormTuningLike(getattr(layer, name)))
    x = tokens()
    labels = labels_of(x)
    got, want = fm.train()(x, labels=labels).loss, base.train()(x, labels=labels).loss
    torch.testing.assert_close(got, want)
    got.backward()
    layer = fm.model.layers[0] if kind == "llama" else fm.transformer.h[0]
    norm = layer.post_attention_layernorm if kind == "llama" else layer.ln_2
    assert norm.tuned.weight.grad is not None


def test_another_librarys_instance_forward_is_not_dropped():
    # accelerate's device_map hooks replace module.forward on the instance: replacing it again would
    # drop them (the weights left on the wrong device); refused, and nothing is patched.
    model = build("llama")
    mlp = model.model.layers[1].mlp
    mlp.forward = lambda x: mlp.down_proj(x)
    with pytest.raises(ValueError, match="LlamaMLP was already replaced"):
        hf.apply_to(model)
    assert "forward" not in vars(model.model.norm) and model.config._attn_implementation == "sdpa"


def test_flags_choose_what_is_patched():
    fm = patched(build("llama"), attention=False, rope=False, mlp=False, loss=False)
    assert fm.config._attn_implementation == "sdpa" and "forward" not in vars(fm)
    assert "forward" in vars(fm.model.norm) and "forward" not in vars(fm.model.layers[0].mlp)
    assert "forward" not in vars(fm.model.layers[0].self_attn) and "forward" in vars(fm.model.layers[0])
    fm = patched(build("gpt2"), residual=False)
    assert "forward" not in vars(fm.transformer.h[0]) and "forward" in vars(fm.transformer.h[0].ln_2)
    # (cross-attention sits between attention and ln_2: such a block keeps HF's forward)
    fm = patched(build("gpt2", add_cross_attention=True))
    assert "forward" not in vars(fm.transformer.h[0]) and "forward" in vars(fm.transformer.h[0].ln_2)


def test_unsupported_models_and_activations_are_refused_by_name():
    with pytest.raises(TypeError, match="LlamaModel"):
        hf.apply_to(build("llama").model)
    # Gemma's RMSNorm scales by (1 + weight) and its MLP is a GELU-tanh gate: not approximated by Llama's.
    with pytest.raises(TypeError, match="got GemmaForCausalLM"):
        hf.apply_to(transformers.GemmaForCausalLM(transformers.GemmaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16)))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        hf.apply_to(build("llama", hidden_act="gelu"))
    hf.apply_to(build("llama", hidden_act="gelu"), mlp=False)
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        hf.apply_to(build("gpt2", activation_function="relu"))


def test_register_attention_is_idempotent_and_selectable_by_name(kernel_calls):
    assert hf.register_attention() == hf.register_attention() == "fmcore"
    base = build("gpt2").eval()
    by_name = transformers.GPT2LMHeadModel._from_config(base.config, attn_implementation="fmcore").eval()
    by_name.load_state_dict(base.state_dict())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(by_name(x).logits, base(x).logits, rtol=1e-4, atol=1e-5)
    assert kernel_calls


def test_dropout_in_training_falls_back_once_with_the_reason(kernel_calls):
    fm = patched(build("gpt2", attn_pdrop=0.1))
    x = tokens()
    with pytest.warns(UserWarning, match="attention dropout in training") as record:
        fm.train()(x, labels=x)
        fm(x, labels=x)
    assert len([w for w in record if "fmcore.hf" in str(w.message)]) == 1
    assert not kernel_calls
    fm.eval()(x)  # no dropout in eval: the kernel again
    assert kernel_calls


def test_import_fmcore_does_not_import_transformers():
    code = "import sys, fmcore; assert 'transformers' not in sys.modules; fmcore.hf.apply_to; " \
           "assert 'transformers' in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_readme_usage_runs(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"```py\n(.*?)```", readme, re.DOTALL)  # the README's Hugging Face usage
    build("llama").save_pretrained(tmp_path)
    script = block.replace('"path/to/llama-or-gpt2"', repr(str(tmp_path)))
    script += "\nout = model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))\nprint(out.loss.item() > 0)\n"
    done = subprocess.run([sys.executable, "-c", "import torch\n" + script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("True")
