"""fmcore.hf: fmcore's kernels patched into Hugging Face models give what the unpatched model gives.

Tiny models on the CPU. Every comparison of values is against the float64 unpatched model, allowing
at most about twice the error of transformers' own same-dtype result (tests/util.py)."""

import copy
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.util import assert_close_to_ref

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("fmcore.hf")

V = 101  # odd vocab: no power-of-two chunking hides an edge


def llama_config(**kw):
    # GQA (4 query heads over 2 kv heads); head dim 16; intermediate 96 (not a multiple of the width);
    # biases on the attention projections so a dropped one shows; no eos so generate runs all its steps
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, attention_bias=True, tie_word_embeddings=False,
                rms_norm_eps=1e-5, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
    return transformers.LlamaConfig(**(base | kw))


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
    if kind == "llama":
        model = transformers.LlamaForCausalLM(llama_config(**kw))
    else:
        model = transformers.GPT2LMHeadModel(gpt2_config(**kw))
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
    """(Sq, Sk) of every call that reached fmcore's flash attention through the interface."""
    calls = []

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1]))
        return flash_attention(q, k, v, **kw)

    flash_attention = hf.flash_attention
    monkeypatch.setattr(hf, "flash_attention", spy)
    return calls


def tokens(B=2, S=37, seed=1):  # 37: not a power of two
    return torch.randint(1, V, (B, S), generator=torch.Generator().manual_seed(seed))


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
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
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


@pytest.mark.parametrize("kind, rope", [("llama", True), ("llama", False), ("gpt2", True)])
def test_mixed_precision_under_autocast_matches_transformers(kind, rope, kernel_calls):
    # fp32 weights, bf16 matmuls: what most training runs do. The kernel must get autocast's dtype
    # (HF's own RoPE, rope=False, multiplies bf16 q and k by fp32 tables: fp32 q and k beside a bf16 v).
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


def test_gradient_checkpointing_gives_the_same_gradients():
    base = build("llama")
    fm = patched(base)
    x = tokens()
    labels = labels_of(x)
    want, g_want = loss_and_grads(fm, x, labels)
    fm.activation_checkpointing_enable()
    got, g_got = loss_and_grads(fm, x, labels, use_cache=False)
    torch.testing.assert_close(got.loss, want.loss)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name])


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


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generate_with_the_kv_cache_matches(kind, kernel_calls):
    base = build(kind).eval()
    fm = patched(base).eval()
    x = tokens(S=9)
    args = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want, got = base.generate(x, **args), fm.generate(x, **args)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the prefill, then one query against the cache each step, all on fmcore's kernel
    assert (9, 9) in kernel_calls and (1, 20) in kernel_calls


def test_a_chunk_after_a_cache_is_bottom_right_causal(kernel_calls):
    # 6 new queries against 10 cached keys + their own: query i sees keys <= 10 + i (FlashAttention's
    # bottom-right alignment, what HF's causal mask is there). Top-left would hide most of the cache.
    base = build("llama").eval()
    fm = patched(base).eval()
    x = tokens(S=16)
    with torch.no_grad():
        outs = []
        for model in (base, fm):
            cache = model(x[:, :10], use_cache=True).cache
            outs.append(model(x[:, 10:], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert (6, 16) in kernel_calls  # not a fallback with a materialized mask


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_padded_batch_falls_back_to_sdpa_and_matches(kind, kernel_calls):
    base = build(kind).eval()
    fm = patched(base).eval()
    x = tokens(S=12)
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding, as generate wants it
    with pytest.warns(UserWarning, match="an attention mask"):
        with torch.no_grad():
            got = fm(x, attention_mask=mask).logits
    with torch.no_grad():
        want = base(x, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)
    assert not kernel_calls
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(fm.generate(x, **gen), base.generate(x, **gen))


def test_a_static_cache_prefill_is_masked_not_read_bottom_right(kernel_calls):
    # A static cache hands attention all its max_cache_len keys, the unwritten ones zeros; HF's SDPA
    # convention leaves such a prefill unmasked (top-left causal hides them). fmcore's bottom-right
    # alignment would attend to the zeros, so the mask function must build the mask there.
    base = build("llama").eval()
    fm = patched(base).eval()
    x = tokens(S=7)
    args = dict(max_new_tokens=5, do_sample=False, cache_implementation="static", output_logits=True,
                return_dict_in_generate=True)
    want = base.generate(x, **args)
    with pytest.warns(UserWarning, match="an attention mask"):
        got = fm.generate(x, **args)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not kernel_calls  # (HF masks every decode step against a static cache too)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_compiles_with_fullgraph(kind):
    # HF marks both models _can_compile_fullgraph; the patched forwards must not break the graph.
    base = build(kind)
    fm = patched(base)
    x = tokens(S=16)
    labels = labels_of(x)
    want, g_want = loss_and_grads(fm, x, labels)
    compiled = torch.compile(fm, fullgraph=True, backend="aot_eager")
    got, g_got = loss_and_grads(compiled, x, labels)
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
    assert "forward" not in vars(fm.model.layers[0].self_attn)


def test_unsupported_models_and_activations_are_refused_by_name():
    with pytest.raises(TypeError, match="LlamaModel"):
        hf.apply_to(build("llama").model)
    with pytest.raises(TypeError, match="MistralForCausalLM"):
        hf.apply_to(transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)))
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
