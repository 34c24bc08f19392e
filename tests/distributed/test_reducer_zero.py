"""GradReducer and ZeroAdamW on 2 CPU ranks (gloo) against single-process references.

- GradReducer: gradients equal a plain per-tensor all-reduce average, with several buckets, a tied
  weight, an unused parameter and gradient accumulation under no_sync().
- ZeroAdamW: 6 steps on 2 ranks (each half of the batch) give the parameters of torch.optim.AdamW on
  the full batch in one process (same param groups, gradient clipping, lr changes); its per-rank
  optimizer state is 1/world of AdamW's; a checkpoint saved with torch.distributed.checkpoint on 2
  ranks resumes on 2 ranks and loads on 1 and on 3 (resharding, several padded buckets per param group).
- ZeroAdamW's overlap: every bucket's reduce-scatter is called inside the backward, the first before
  the last gradient arrives; none under no_sync(); the results equal, bit for bit, those of the same
  steps with every reduce-scatter deferred to step() (and of accumulating without no_sync()).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from fmcore.dist import Communicator, GradReducer, ZeroAdamW
from tests.distributed.launch import run_ranks

VOCAB, DIM, BATCH, SEQ = 37, 24, 4, 5  # odd sizes so flat buffers do not split evenly over ranks


class Tiny(torch.nn.Module):
    """Embedding -> 2 MLP layers -> head tied to the embedding, plus a parameter no forward uses."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.fc1 = torch.nn.Linear(DIM, 3 * DIM)
        self.fc2 = torch.nn.Linear(3 * DIM, DIM)
        self.norm = torch.nn.LayerNorm(DIM)
        self.unused = torch.nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = self.emb(x)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        logits = self.norm(h) @ self.emb.weight.T
        return logits

    def loss(self, x, y):
        return torch.nn.functional.cross_entropy(self.forward(x).flatten(0, 1), y.flatten())


def make_model() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def batch(step: int, world: int):
    """The global batch of a step: world * BATCH sequences."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, VOCAB, (world * BATCH, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (world * BATCH, SEQ), generator=g)
    return x, y


def local(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * BATCH:(rank + 1) * BATCH]


# ---- GradReducer
def _reducer_body(rank, world):
    comm = Communicator()
    model, ref = make_model(), make_model()
    reducer = GradReducer(model.parameters(), comm, bucket_mb=4096 / 2**20)  # 4 KiB: several buckets
    assert len(reducer.buckets) > 2
    for step in range(2):
        x, y = batch(step, world)
        # gradient accumulation: micro-batch 0 without communication, micro-batch 1 reduced
        with reducer.no_sync():
            model.loss(local(x, rank)[:2], local(y, rank)[:2]).backward()
        model.loss(local(x, rank)[2:], local(y, rank)[2:]).backward()
        reducer.finish()
        ref.loss(local(x, rank)[:2], local(y, rank)[:2]).backward()
        ref.loss(local(x, rank)[2:], local(y, rank)[2:]).backward()
        for name, p in ref.named_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=f"step {step} {name}")
        assert torch.all(model.unused.grad == 0)
        model.zero_grad()
        ref.zero_grad()
    return reducer.bucket_sizes


def test_reducer_matches_plain_all_reduce(tmp_path):
    sizes = run_ranks(_reducer_body, 2, tmp_path)
    n_params = sum(p.numel() for p in make_model().parameters())
    assert sizes[0] == sizes[1] and sum(sizes[0]) == n_params  # every parameter once (tied weight once)


def test_reducer_rejects_bad_args():
    comm = object()
    with pytest.raises(ValueError, match="expected op"):
        GradReducer([], comm, op="max")
    with pytest.raises(ValueError, match="bucket_mb"):
        GradReducer([], comm, bucket_mb=0)


# ---- ZeroAdamW
STEPS = 6
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
CLIP = 0.5  # small enough that some steps clip
BUCKET_MB = 4096 / 2**20  # 4 KiB: several buckets per param group, one of them padded (149 elements)


def param_groups(model: Tiny):
    decay = [model.fc1.weight, model.fc2.weight, model.emb.weight]
    no_decay = [p for p in model.parameters() if all(p is not q for q in decay)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def train(model, opt, steps, world, rank, clip_fn, start=0):
    for step in range(start, start + steps):
        for g in opt.param_groups:
            g["lr"] = HYPER["lr"] * (1 - step / 10)  # a schedule must reach the sharded optimizer
        x, y = batch(step, world)
        if rank is None:
            model.loss(x, y).backward()
        else:
            model.loss(local(x, rank), local(y, rank)).backward()
        clip_fn()
        opt.step()
        opt.zero_grad()


def reference(steps: int, world: int) -> tuple[Tiny, torch.optim.AdamW]:
    model = make_model()
    opt = torch.optim.AdamW(param_groups(model), **HYPER, foreach=True)
    train(model, opt, steps, world, None, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
    return model, opt


def full_state(opt: ZeroAdamW) -> dict[str, torch.Tensor]:
    """The optimizer's sharded state (master and moments, per bucket), each gathered whole (collective)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() for k, v in opt.state_dict().items() if isinstance(v, DTensor)}


def _zero_body(rank, world, ckpt, impl):
    comm = Communicator()
    model = make_model()
    opt = ZeroAdamW(param_groups(model), comm, **HYPER, impl=impl, bucket_mb=BUCKET_MB)
    norms = []
    train(model, opt, STEPS, world, rank, lambda: norms.append(opt.clip_grad_norm_(CLIP)))
    assert any(n > CLIP for n in norms)  # clipping was exercised
    ref, ref_opt = reference(STEPS, world)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6, msg=name)

    # memory: the moments on this rank are 1/world of AdamW's (up to the padding of the last shard)
    moments = sum(v.numel() * v.element_size() for f in opt._flats
                  for v in opt.inner.state[f.master].values() if f.is_sharded(v))
    ref_moments = 2 * 4 * sum(p.numel() for p in ref.parameters())  # AdamW: exp_avg, exp_avg_sq in fp32
    assert ref_moments - 2 * 4 * ref.unused.numel() == sum(
        v.numel() * v.element_size() for s in ref_opt.state.values() for v in s.values() if v.dim() > 0)
    buckets = [b for f in opt._flats for b in f.buckets]
    assert len(buckets) > len(opt._flats)  # several buckets in a param group
    pad = sum(world * f.shard_numel - f.numel for f in opt._flats) * 2 * 4  # each bucket pads < world
    assert moments * world == ref_moments + pad and pad < len(buckets) * world * 8
    assert opt.state_bytes() == moments * 3 // 2  # + the fp32 master shard

    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=ckpt)
    saved = full_state(opt)
    # resume on the same world size: a fresh model and optimizer, loaded, continue 2 steps and match
    # the reference that never stopped
    model2, opt2 = _loaded(comm, ckpt, impl)
    train(model2, opt2, 2, world, rank, lambda: opt2.clip_grad_norm_(CLIP), start=STEPS)
    ref2, _ = reference(STEPS + 2, world)
    for (name, p), q in zip(model2.named_parameters(), ref2.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6, msg=f"resumed {name}")
    return saved


def _loaded(comm, ckpt, impl):
    """A fresh model and ZeRO optimizer with the checkpoint at ckpt loaded into both."""
    model = make_model()
    opt = ZeroAdamW(param_groups(model), comm, **HYPER, impl=impl, bucket_mb=BUCKET_MB)
    sd = {"model": model.state_dict(), "optim": opt.state_dict()}
    dcp.load(sd, checkpoint_id=ckpt)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optim"])
    return model, opt


def _load_body(rank, world, ckpt, impl):
    model, opt = _loaded(Communicator(), ckpt, impl)
    return full_state(opt), {k: v.clone() for k, v in model.state_dict().items()}


# The inner optimizer: torch.optim.AdamW, or fmcore's FusedAdamW on the flat fp32 shard.
@pytest.mark.parametrize("impl", ["torch", "fmcore"])
def test_zero1_matches_adamw_and_reshards(tmp_path, impl):
    ckpt = str(tmp_path / "ckpt")
    saved, _ = run_ranks(_zero_body, 2, tmp_path / "two", args=(ckpt, impl))
    ref, _ = reference(STEPS, 2)
    # 1 rank: no padding; 3 ranks: every bucket split anew (the 149-element one as 50, 50, 49)
    for world in (1, 3):
        loaded, params = run_ranks(_load_body, world, tmp_path / f"load{world}", args=(ckpt, impl))[0]
        assert saved.keys() == loaded.keys() and any(".bucket1." in k for k in saved)
        for k in saved:
            assert torch.equal(saved[k], loaded[k]), f"{k} differs after loading on {world} ranks"
        for name, p in ref.named_parameters():
            torch.testing.assert_close(params[name], p.detach(), rtol=2e-5, atol=2e-6, msg=f"{world} ranks: {name}")


def test_zero1_needs_parameters():
    class FakeComm:
        world_size, rank = 2, 0

    with pytest.raises(ValueError, match="no parameters"):
        ZeroAdamW([torch.nn.Parameter(torch.zeros(3), requires_grad=False)], FakeComm())
    model = copy.deepcopy(make_model())
    with pytest.raises(ValueError, match="expected impl"):
        ZeroAdamW(model.parameters(), FakeComm(), impl="nope")


# ---- ZeRO-1's reduce-scatters overlap the backward
LAYERS = 4


class Chain(torch.nn.Module):
    """An embedding, then LAYERS tanh(Linear) layers; every parameter is used. Param groups as the
    trainer makes them: the weights decay, the embedding and the biases do not."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(DIM, DIM) for _ in range(LAYERS))

    def loss(self, x):
        h = self.emb(x)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h.square().mean()

    def groups(self):
        return [{"params": [layer.weight for layer in self.layers], "weight_decay": 0.1},
                {"params": [self.emb.weight] + [layer.bias for layer in self.layers], "weight_decay": 0.0}]


def chain_batch(step: int, micro: int, rows: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(1000 * step + micro))


def _overlap_body(rank, world):
    """Three ZeroAdamW runs of 3 steps x 2 micro-batches (gradient accumulation), which must end in the
    same parameters bit for bit, and match torch.optim.AdamW on the global batch:
    - overlap: micro-batch 0 under no_sync(), micro-batch 1's backward launches every reduce-scatter;
    - deferred: both under no_sync(), so every reduce-scatter starts in step() (the math before overlap);
    - again: no no_sync(): micro-batch 1's backward discards micro-batch 0's reduce-scatters and
      launches them again on the accumulated gradients.
    The event log records each reduce-scatter call and each gradient's arrival (a hook registered
    before ZeroAdamW's own, so it runs first)."""
    comm = Communicator()
    log: list[str] = []
    reduce_scatter = comm.reduce_scatter

    def recording_reduce_scatter(*args, **kwargs):
        log.append("rs")
        return reduce_scatter(*args, **kwargs)

    comm.reduce_scatter = recording_reduce_scatter

    def run(mode: str):
        model = Chain()
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: log.append(name))
        # 2400 bytes: one layer's weight (24 x 24 fp32) per bucket; the biases share one, the embedding
        # has its own. module=model: the buckets follow the backward (last layer first).
        opt = ZeroAdamW(model.groups(), comm, **HYPER, impl="torch", bucket_mb=2400 / 2**20, module=model)
        n = len(opt._grads.buckets)
        assert n == LAYERS + 2
        for step in range(3):
            for micro in range(2):
                log.clear()
                x = chain_batch(step, micro, world * BATCH).chunk(world)[rank]
                sync = mode == "again" or (mode == "overlap" and micro == 1)
                with contextlib.nullcontext() if sync else opt.no_sync():
                    (model.loss(x) / 2).backward()
                if not sync:
                    assert log.count("rs") == 0, f"{mode}: a reduce-scatter under no_sync()"
                    continue
                # Every bucket launched before backward returned, and the last LAYERS - 1 layers'
                # buckets before the first layer's gradients were computed.
                assert log.count("rs") == n, f"{mode} step {step}: {log}"
                first_layer = min(log.index(f"layers.0.{w}") for w in ("weight", "bias"))
                assert log[:first_layer].count("rs") >= LAYERS - 1, f"{mode}: not overlapped: {log}"
            log.clear()
            opt.clip_grad_norm_(CLIP)
            opt.step()
            assert log.count("rs") == (n if mode == "deferred" else 0), f"{mode} step(): {log}"
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    results = {mode: run(mode) for mode in ("overlap", "deferred", "again")}
    for mode in ("deferred", "again"):
        for a, b in zip(results["overlap"], results[mode]):
            assert torch.equal(a, b), f"overlap and {mode} differ"

    ref = Chain()
    opt = torch.optim.AdamW(ref.groups(), **HYPER, foreach=True)
    for step in range(3):
        for micro in range(2):
            (ref.loss(chain_batch(step, micro, world * BATCH)) / 2).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    for a, b in zip(results["overlap"], ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    return True


def test_zero1_reduce_scatter_overlaps_backward(tmp_path):
    assert all(run_ranks(_overlap_body, 2, tmp_path))


# ---- CUDA: the same algorithms over fmcore's NCCL communicator at world size 1 (the H100 machine has
# one GPU): averaging over one rank is the identity, so this checks the stream plumbing of both (the
# side stream, the hooks running in autograd's thread, the in-order launch; several buckets each) and
# ZeRO-1's CUDA step.
def _cuda_body(rank, world):
    dev = torch.device("cuda", 0)
    comm = Communicator(backend="nccl", device=dev)
    model, ref = make_model().to(dev), make_model().to(dev)
    reducer = GradReducer(model.parameters(), comm, bucket_mb=4096 / 2**20)
    x, y = (t.to(dev) for t in batch(0, 1))
    model.loss(x, y).backward()
    reducer.finish()
    ref.loss(x, y).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        expect = q.grad if q.grad is not None else torch.zeros_like(q)
        torch.testing.assert_close(p.grad, expect, rtol=0, atol=0, msg=name)

    for impl in ("torch", "fmcore"):  # inner optimizer: torch's fused AdamW, fmcore's FusedAdamW
        model, ref = make_model().to(dev), make_model().to(dev)
        opt = ZeroAdamW(param_groups(model), comm, **HYPER, impl=impl, bucket_mb=BUCKET_MB, module=model)
        ref_opt = torch.optim.AdamW(param_groups(ref), **HYPER, fused=True)
        for step in range(3):
            x, y = (t.to(dev) for t in batch(step, 1))
            model.loss(x, y).backward()
            ref.loss(x, y).backward()
            opt.clip_grad_norm_(CLIP)
            torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            # ("unused": torch's AdamW skips it, ZeRO-1 steps it with a zero gradient and no decay: unchanged)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{impl} {name}")
    comm.synchronize()
    return True


@pytest.mark.cuda
def test_reducer_and_zero1_over_nccl_world_size_1(tmp_path):
    from fmcore import _C
    from tests.distributed.launch import run_inline

    if not _C.has_nccl:
        pytest.fail("fmcore was built without NCCL on a CUDA machine")
    assert run_inline(_cuda_body, tmp_path)
