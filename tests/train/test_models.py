"""Models: exact parameter counts and FLOPs, document masking, and the fmcore vs torch ops paths."""

import dataclasses

import pytest
import torch

from fmcore.train import models
from fmcore.train.config import ConfigError, ModelConfig, load_config

GPT = ModelConfig(arch="gpt2", dim=64, n_layers=2, n_heads=4, max_seq_len=64, ops="torch")
LLAMA = ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, ops="torch",
                    tie_embeddings=False)
# Qwen3's attention with Qwen2's biases: q/k norms over heads of 24 (4 * 24 = 96 features, not dim)
QWEN = dataclasses.replace(LLAMA, head_dim=24, qk_norm=True, qkv_bias=True)
# Mistral's sliding window, shorter than the sequences and documents below
MISTRAL = dataclasses.replace(LLAMA, sliding_window=5)


@pytest.mark.parametrize("cfg", [
    GPT, dataclasses.replace(GPT, bias=False), dataclasses.replace(GPT, tie_embeddings=False, ffn_dim=100),
    LLAMA, dataclasses.replace(LLAMA, n_kv_heads=1, tie_embeddings=True),  # MQA, tied
    dataclasses.replace(LLAMA, dim=96, n_heads=3, n_kv_heads=3, ffn_dim=0),  # odd head count, derived ffn
    dataclasses.replace(LLAMA, qkv_bias=True),  # Qwen2's q/k/v biases
    # Qwen3: q/k norms, heads of 24 whose 4 * 24 features are not dim (70: no multiple of n_heads either)
    dataclasses.replace(LLAMA, dim=70, head_dim=24, qk_norm=True, tie_embeddings=True),
    dataclasses.replace(LLAMA, head_dim=8, qk_norm=True, qkv_bias=True),
], ids=["gpt2", "gpt2-nobias", "gpt2-untied", "llama-gqa", "llama-mqa-tied", "llama-mha", "qwen2", "qwen3",
        "qwen3-bias"])
def test_param_count_is_exact(cfg):
    cfg = models.resolve(cfg, vocab_size=1000)  # 1000 rounds up to 1024: not a multiple of 64 on purpose
    assert cfg.vocab_size == 1024
    model = models.build_model(cfg)
    assert models.param_count(cfg) == sum(p.numel() for p in model.parameters())
    lookups = (cfg.max_seq_len * cfg.dim if cfg.arch == "gpt2" else 0) + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    assert models.matmul_param_count(cfg) == models.param_count(cfg) - lookups


def test_flops_per_token_matches_the_published_gpt2_numbers():
    # The baselines: GPT-2 124M at 452k tok/s is 39.1% of 989 TFLOP/s, 350M at 176k tok/s 43.2%.
    for preset, tok_s, mfu in (("gpt2-124m", 452e3, 39.1), ("gpt2-350m", 176e3, 43.2)):
        cfg = load_config(preset)
        m = models.resolve(cfg.model, device="cpu")
        flops = models.flops_per_token(m, cfg.train.seq_len)
        assert 100 * flops * tok_s / 989e12 == pytest.approx(mfu, abs=0.05)
    m = models.resolve(load_config("gpt2-124m").model)
    assert models.param_count(m) == 124_475_904  # GPT-2 small with the vocab padded to 50304
    assert models.flops_per_token(m, 1024) == 6 * 123_689_472 + 12 * 12 * 12 * 64 * 1024
    llama = models.resolve(load_config("llama-1b").model)
    assert models.param_count(llama) == 1_100_048_384  # TinyLlama-1.1B's published count



def test_flops_per_token_counts_a_sliding_window_s_keys():
    # Mistral's convention (a token sees itself and W - 1 before it): the attention term's T becomes
    # min(T, W), the band's width; shorter sequences than the window are unchanged.
    windowed = models.resolve(dataclasses.replace(LLAMA, sliding_window=16), vocab_size=64)
    full = models.resolve(LLAMA, vocab_size=64)
    attention = 12 * LLAMA.n_layers * LLAMA.n_heads * (LLAMA.dim // LLAMA.n_heads)
    assert models.flops_per_token(windowed, 64) == models.flops_per_token(full, 64) - attention * (64 - 16)
    assert models.flops_per_token(windowed, 16) == models.flops_per_token(full, 16)
    assert models.flops_per_token(windowed, 8) == models.flops_per_token(full, 8)

QWEN_SHAPES = {  # the published config.json shapes (no weights downloaded)
    "Qwen2.5-0.5B": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936,
                         hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True),
    "Qwen3-0.6B": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
                       hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", QWEN_SHAPES)
def test_qwen_param_count_and_flops_count_transformers_modules(tmp_path, name):
    # fmcore's count against the parameters of transformers' own module (on the meta device), the shape
    # from init_from's reading of the config.json; the attention FLOPs take the head dim (Qwen3-0.6B's 128,
    # not 1024 / 16 = 64).
    import json

    transformers = pytest.importorskip("transformers")
    from fmcore.train.init_from import configure

    (tmp_path / "config.json").write_text(json.dumps(QWEN_SHAPES[name]))
    cfg = load_config("tiny")
    cfg.model.init_from = str(tmp_path)
    m = models.resolve(dataclasses.replace(configure(cfg).model, ops="torch"))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
        ours = models.build_model(m)
    assert models.param_count(m) == sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())
    hd = QWEN_SHAPES[name].get("head_dim", 64)  # (Qwen2.5-0.5B: 896 / 14)
    assert models.flops_per_token(m, 4096) == 6 * models.param_count(m) + 12 * m.n_layers * m.n_heads * hd * 4096


def test_qkv_biases_and_qk_norms_get_no_weight_decay():
    from fmcore.train.trainer import param_groups

    cfg = models.resolve(dataclasses.replace(LLAMA, qkv_bias=True, qk_norm=True, head_dim=8), vocab_size=64)
    model = models.build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(model, load_config("tiny")))
    assert {"blocks.1.wqkv.bias", "blocks.1.q_norm.weight", "blocks.1.k_norm.weight"} <= no_decay
    assert decay == {n for n in names.values() if n.endswith(("wqkv.weight", "wo.weight", "w_gate_up.weight",
                                                              "w_down.weight", "lm_head.weight"))}


def test_initial_weights_do_not_depend_on_the_threads_that_draw_them(monkeypatch):
    from fmcore.train.models import base

    monkeypatch.setattr(base, "CHUNK_VALUES", 100)  # (the 64-wide matrices: one row a chunk)
    cfg = models.resolve(LLAMA, vocab_size=64)
    threads = torch.get_num_threads()
    try:
        weights = []
        for n in (1, 3):
            torch.set_num_threads(n)
            weights.append(dict(models.build_model(cfg, seed=4).named_parameters()))
    finally:
        torch.set_num_threads(threads)
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name
    # every chunk (row) its own draws: no two rows of the model's matrices begin alike
    rows = torch.cat([v.detach()[:, :16] / v.std() for v in weights[0].values() if v.dim() == 2])
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0] > 1000


@pytest.mark.parametrize("base", [GPT, LLAMA, MISTRAL], ids=["gpt2", "llama", "mistral"])
def test_document_mask_equals_separate_documents(base):
    """A row packing two documents (positions restart at 0) gives each the loss it gets alone."""
    cfg = models.resolve(base, vocab_size=100)
    model = models.build_model(cfg, seed=1).double()
    torch.manual_seed(0)
    a, b = torch.randint(0, 100, (1, 7)), torch.randint(0, 100, (1, 9))  # uneven lengths
    x = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    packed = model(x, positions=positions)
    alone = torch.cat([model(a), model(b)], 1)
    torch.testing.assert_close(packed, alone)
    assert not torch.allclose(model(x)[:, 7:], alone[:, 7:])  # without the mask the second document sees the first


@pytest.mark.parametrize("base", [GPT, LLAMA], ids=["gpt2", "llama"])
def test_loss_is_cross_entropy_of_logits(base):
    cfg = models.resolve(base, vocab_size=100)
    model = models.build_model(cfg)
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    ref = torch.nn.functional.cross_entropy(model(x).reshape(-1, cfg.vocab_size), y.reshape(-1))
    torch.testing.assert_close(model(x, y), ref)


@pytest.mark.parametrize("base", [GPT, LLAMA], ids=["gpt2", "llama"])
def test_bf16_weights_give_an_unrounded_loss_on_both_ops_paths(base):
    # train.precision "bf16" (bf16 weights, no autocast): the fmcore path's loss came back rounded to bf16
    # (6.9375 for 6.9399, steps of 1/32 near 7), and the logged train and eval losses with it; the torch
    # path's, from fp32 logits, was not.
    torch.manual_seed(0)
    x, y = torch.randint(0, 100, (4, 32)), torch.randint(0, 100, (4, 32))
    losses = {}
    for ops in ("torch", "fmcore"):
        model = models.build_model(models.resolve(dataclasses.replace(base, ops=ops), vocab_size=100), seed=0)
        losses[ops] = model.to(torch.bfloat16)(x, y)
    assert losses["fmcore"].dtype == torch.float32
    assert losses["fmcore"].item() != losses["fmcore"].to(torch.bfloat16).item()  # not a bf16 value
    assert losses["fmcore"].item() == pytest.approx(losses["torch"].item(), abs=2e-3)


def test_lm_loss_refuses_a_head_weight_of_another_dtype_than_h():
    # (the fmcore path's bf16 autocast, for an unrounded loss, cast an fp32 weight to bf16 silently;
    # F.linear on the torch path refuses the mismatch)
    from fmcore.train.models.common import lm_loss

    h, w, t = torch.randn(2, 4, 8, dtype=torch.bfloat16), torch.randn(16, 8), torch.randint(0, 16, (2, 4))
    for ops in ("torch", "fmcore"):
        with pytest.raises((RuntimeError, ValueError), match="dtype|BFloat16"):
            lm_loss(h, w, t, ops)


@pytest.mark.parametrize("base, ops", [
    (LLAMA, "torch"),
    # The fmcore blocks hand (branch output, stream) to the next block: checkpointing them per block
    # must recompute the same values.
    (GPT, "fmcore"),
    (dataclasses.replace(GPT, bias=False), "fmcore"),
    (LLAMA, "fmcore"),
], ids=["llama-torch", "gpt2-fmcore", "gpt2-nobias-fmcore", "llama-fmcore"])
def test_activation_checkpointing_gives_the_same_gradients(base, ops):
    cfg = dataclasses.replace(models.resolve(base, vocab_size=100), ops=ops)
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    grads = []
    for ac in (False, True):
        model = models.build_model(cfg)
        model.activation_checkpointing = ac
        model(x, y).backward()
        grads.append([p.grad for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16"])
@pytest.mark.parametrize("norm_cls", [torch.nn.LayerNorm, torch.nn.RMSNorm])
def test_fused_block_boundary_feeds_the_matmul_what_torch_does(device, precision, norm_cls):
    """Under autocast (fp32 stream and norm weights, bf16 branch outputs) and in pure bf16, the fused
    add + norm gives the stream torch's ``residual + x`` gives, bit for bit, and the normed values the
    next matmul reads (torch's norm output cast to bf16 by autocast) to within a bf16 rounding."""
    from fmcore.train.models.common import add_norm

    torch.manual_seed(0)
    dtype = torch.float32 if precision == "bf16-autocast" else torch.bfloat16
    norm = norm_cls(64).to(device, dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    residual = torch.randn(4, 8, 64, device=device, dtype=dtype)
    x = torch.randn(4, 8, 64, device=device, dtype=torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        normed, stream = add_norm(norm, x, residual)
        want_stream = residual + x
        want = norm(want_stream).to(torch.bfloat16)  # what F.linear's autocast cast makes of it
    assert stream.dtype == want_stream.dtype and torch.equal(stream, want_stream)
    assert normed.dtype == torch.bfloat16
    # One bf16 rounding apart; two for pure-bf16 RMSNorm, which torch's CPU kernel rounds twice
    # (x * rstd, then * weight) where add_norm rounds its fp32 result once.
    ulps = 2 if precision == "bf16" and norm_cls is torch.nn.RMSNorm else 1
    torch.testing.assert_close(normed, want, rtol=ulps * 2 ** -8, atol=1e-6)


@pytest.mark.parametrize("base", [GPT, LLAMA, QWEN, MISTRAL], ids=["gpt2", "llama", "qwen", "mistral"])
@pytest.mark.parametrize("docs", [False, True], ids=["dense", "documents"])
def test_fmcore_ops_match_torch_ops(device, base, docs):
    """The A/B switch changes kernels, not the function: same loss and gradients (fp32)."""
    cfg = models.resolve(base, vocab_size=100)
    torch.manual_seed(0)
    x, y = torch.randint(0, 100, (2, 24), device=device), torch.randint(0, 100, (2, 24), device=device)
    positions = cu = None
    if docs:  # row 0: documents of 10 and 14 tokens; row 1: one document
        positions = torch.stack([torch.cat([torch.arange(10), torch.arange(14)]), torch.arange(24)]).to(device)
        cu = torch.tensor([0, 10, 24, 48], dtype=torch.int32, device=device)
    out = {}
    for ops in ("torch", "fmcore"):
        model = models.build_model(dataclasses.replace(cfg, ops=ops)).to(device)
        loss = model(x, y, positions, cu)
        loss.backward()
        out[ops] = (loss.detach(), [p.grad for p in model.parameters()])
    torch.testing.assert_close(out["fmcore"][0], out["torch"][0], rtol=1e-5, atol=1e-5)
    for g_f, g_t in zip(out["fmcore"][1], out["torch"][1]):
        torch.testing.assert_close(g_f, g_t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base,fused,unfused", [(GPT, "bias_gelu", "gelu"), (LLAMA, "swiglu", "silu")],
                         ids=["gpt2", "llama"])
def test_fmcore_mlp_runs_the_fused_activation(base, fused, unfused):
    """The fmcore path's MLPs run fmcore's fused activation, forward and backward once a block (GPT-2:
    bias_gelu, with fc's bias inside; Llama: swiglu on the packed gate/up projection); the torch path
    runs none of them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(func)
            return func(*args, **(kwargs or {}))

    forward, backward = getattr(torch.ops.fmcore, fused).default, getattr(torch.ops.fmcore, fused + "_bwd").default
    eager = getattr(torch.ops.aten, unfused).default
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    for ops in ("fmcore", "torch"):
        model = models.build_model(dataclasses.replace(models.resolve(base, vocab_size=100), ops=ops))
        with Count() as count:
            model(x, y).backward()
        n_fused, n_unfused = (base.n_layers, 0) if ops == "fmcore" else (0, base.n_layers)
        assert count.calls.count(forward) == n_fused
        assert count.calls.count(backward) == n_fused
        assert count.calls.count(eager) == n_unfused


def test_masks_from_positions_and_from_cu_seqlens_agree(dataset):
    """The torch path masks from the loader's positions, the SDPA fallback of the fmcore path from its
    cu_seqlens: on real packed batches both give the same block-diagonal causal mask."""
    from fmcore.data import Loader
    from fmcore.train.models.common import _mask_from_cu_seqlens, doc_mask

    seen_boundary = False
    causal = torch.ones(256, 256, dtype=torch.bool).tril()
    with Loader(dataset, batch_size=8, seq_len=256, doc_boundaries=True) as loader:
        for _ in range(10):
            batch = next(loader)
            from_positions = doc_mask(batch.positions, None, "torch").mask
            assert torch.equal(from_positions, _mask_from_cu_seqlens(batch.cu_seqlens, 8, 256))
            seen_boundary |= bool((causal & ~from_positions).any())
    assert seen_boundary  # some batch did pack several documents into a row


@pytest.mark.parametrize("base,backend", [
    (GPT, "aot_eager"), (GPT, "inductor"), (LLAMA, "aot_eager"), (LLAMA, "inductor"),
    (QWEN, "aot_eager"),  # (the q/k norms' capture; inductor lowers nothing new there, ~16 s cold)
], ids=["gpt2-aot_eager", "gpt2-inductor", "llama-aot_eager", "llama-inductor", "qwen-aot_eager"])
def test_fmcore_model_compiles_without_graph_breaks(base, backend):
    """train.compile must capture the whole forward and backward, fmcore ops included (their fake
    and autograd registrations). aot_eager checks the capture alone; inductor (what train.compile
    and the train benchmark's fmcore-compile use) also lowers the graphs around fmcore's ops, which
    it calls as fallback kernels with the strides the trace saw (its CPU code, ~10 s cold)."""
    cfg = dataclasses.replace(models.resolve(base, vocab_size=100), ops="fmcore")
    model = models.build_model(cfg)
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    loss = compiled(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x, y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_greedy_sample_with_right_padding_equals_plain_greedy_decoding():
    from fmcore.train.trainer import greedy_sample

    cfg = models.resolve(LLAMA, vocab_size=100)
    model = models.build_model(cfg, seed=2)
    prompt = torch.randint(0, 100, (1, 5))
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(6):  # the reference: grow the sequence one token at a time, no padding
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)
    assert greedy_sample(model, prompt, 6, "fp32", cfg.max_seq_len) == ids[0, 5:].tolist()
    assert len(greedy_sample(model, prompt, 500, "fp32", cfg.max_seq_len)) == cfg.max_seq_len - 5  # clamped
    # More tokens asked than fit after the prompt: the whole prompt is still what is continued (the
    # trainer prints it next to the sample), with as many tokens as fit.
    long = torch.randint(0, 100, (1, cfg.max_seq_len // 2))
    ids = long.clone()
    with torch.no_grad():
        while ids.shape[1] < cfg.max_seq_len:
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)
    assert greedy_sample(model, long, cfg.max_seq_len, "fp32", cfg.max_seq_len) == ids[0, long.shape[1]:].tolist()
    # A model of one position has no room for a prompt and a token (was: a shape mismatch, ending the run)
    assert greedy_sample(model, prompt, 6, "fp32", 1) == []


@pytest.mark.parametrize("base", [GPT, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("ops", ["torch", "fmcore"])
def test_a_sequence_longer_than_max_seq_len_is_refused_by_name(base, ops):
    model = models.build_model(models.resolve(dataclasses.replace(base, ops=ops), vocab_size=100))
    model(torch.zeros(1, base.max_seq_len, dtype=torch.long))
    with pytest.raises(ValueError, match="65 tokens per sequence but the model takes at most model.max_seq_len = 64"):
        model(torch.zeros(1, base.max_seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("ops", ["torch", "fmcore"])
@pytest.mark.parametrize("base", [GPT, LLAMA], ids=["gpt2", "llama"])
def test_document_mask_from_positions_alone_on_both_ops_paths(base, ops):
    """positions without cu_seqlens mask attention on the fmcore path as on the torch path (it used to
    attend across documents there, silently); cu_seqlens without positions is an error (it used to be
    ignored on both paths)."""
    cfg = models.resolve(dataclasses.replace(base, ops=ops), vocab_size=100)
    model = models.build_model(cfg, seed=1).double()
    torch.manual_seed(0)
    x = torch.randint(0, 100, (2, 12))
    # Row 0: documents of 3, 1 and 8 tokens; row 1 starts mid-document (positions 4..) then one of 5.
    positions = torch.stack([torch.cat([torch.arange(3), torch.arange(1), torch.arange(8)]),
                             torch.cat([torch.arange(4, 11), torch.arange(5)])])
    packed = model(x, positions=positions)
    for row, segments in ((0, [(0, 3), (3, 4), (4, 12)]), (1, [(0, 7), (7, 12)])):
        for a, b in segments:
            want = model(x[row:row + 1, a:b], positions=positions[row:row + 1, a:b])
            torch.testing.assert_close(packed[row:row + 1, a:b], want)
    cu = torch.tensor([0, 3, 4, 12, 19, 24], dtype=torch.int32)
    torch.testing.assert_close(model(x, positions=positions, cu_seqlens=cu, max_seqlen=8), packed)
    with pytest.raises(ValueError, match="cu_seqlens needs positions"):
        model(x, cu_seqlens=cu, max_seqlen=8)


@pytest.mark.parametrize("base", [GPT, LLAMA], ids=["gpt2", "llama"])
def test_a_torch_block_takes_the_stream_as_residual_plus_h_as_an_fmcore_block_does(base):
    # (fmcore's blocks pass the stream on as (h, residual); in a model of one ops path a torch block
    # always gets residual None, but the block's contract is the sum)
    cfg = models.resolve(base, vocab_size=100)
    blocks = {ops: models.build_model(dataclasses.replace(cfg, ops=ops), seed=0).blocks[0].double()
              for ops in ("torch", "fmcore")}
    h, residual = torch.randn(2, 8, cfg.dim, dtype=torch.float64), torch.randn(2, 8, cfg.dim, dtype=torch.float64)
    out, none = blocks["torch"](h, residual, None, None)
    assert none is None
    torch.testing.assert_close(out, blocks["torch"](residual + h, None, None, None)[0])
    mlp, stream = blocks["fmcore"](h, residual, None, None)
    torch.testing.assert_close(out, stream + mlp)


def test_resolve_and_build_model_name_what_the_config_lacks():
    with pytest.raises(ConfigError, match="model.vocab_size is 0 \\(take the dataset's\\) but no dataset vocabulary"):
        models.resolve(dataclasses.replace(GPT, vocab_size=0), None)
    with pytest.raises(ConfigError, match=r"model.vocab_size \(100\) is smaller than the dataset's vocabulary \(512\)"):
        models.resolve(dataclasses.replace(GPT, vocab_size=100), 512)
    with pytest.raises(ValueError, match="build_model needs a resolved config: call models.resolve"):
        models.build_model(GPT)


@pytest.mark.parametrize("ops", ["torch", "fmcore"])
def test_a_sliding_window_hides_the_keys_before_it(ops):
    from fmcore.train.models.common import causal_attention, doc_mask

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 12, 4, 16), torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    full = causal_attention(q, k, v, ops)
    torch.testing.assert_close(causal_attention(q, k, v, ops, window=12), full)  # as long as the sequence
    # window 1: each token sees itself alone, its own value (each kv head serves two query heads)
    torch.testing.assert_close(causal_attention(q, k, v, ops, window=1), v.repeat_interleave(2, dim=2))
    # window 3 against the explicit mask in float64: keys i - 2 .. i, within the documents of 5 and 7 tokens
    positions = torch.cat([torch.arange(5), torch.arange(7)]).repeat(2, 1)
    got = causal_attention(q, k, v, ops, doc_mask(positions, None, ops), window=3)
    i = torch.arange(12)
    doc = (positions[0] == 0).cumsum(0)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 3) & (doc[:, None] == doc[None, :])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, 2)) / 4
    want = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~allowed, -torch.inf).softmax(-1),
                        v.double().repeat_interleave(2, 2))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
