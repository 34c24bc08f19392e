"""The training loop and ``fmcore train``.

    fmcore train                                   # tiny preset on the embedded corpus (GPU if present)
    fmcore train gpt2-124m --optim.lr 3e-4         # a preset plus overrides
    fmcore train my.toml --resume auto             # continue the newest complete checkpoint
    torchrun --nproc-per-node 8 -m fmcore train gpt2-124m --parallel.data ddp

The pieces a parallelism or model change hooks into are separate functions: setup_distributed,
build_model (built on the meta device, laid out by fmcore.train.parallel.apply_parallelism, then each
rank fills its own shards), build_optimizer. One optimizer step = accumulate gradients over
micro-batches up to train.tokens_per_step, check the loss and the gradient norm for non-finite values
(one host sync per step), then clip and step, or skip and count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fmcore.data.shards import ShardError
from fmcore.train import checkpoint, init_from, metrics, models, relayout, resume
from fmcore.train.config import (Config, ConfigError, ModelConfig, compile_mode, help_text, load_config, parse_mix,
                                 parse_profile, presets, to_dict, to_toml, validate)
from fmcore.train.profiling import StepProfiler
from fmcore.train.schedule import lr_at


class TrainingStopped(RuntimeError):
    """The run stopped early (too many non-finite steps); a checkpoint of the last good state was saved."""


class OutOfMemory(RuntimeError):
    """A training step ran out of device memory; the message adds plan-memory's settings that lower it."""


@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


# ---- setup: each a separate function so parallelism and other model code can hook in

def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected an integer (torchrun sets it)") from None


def process_coords() -> tuple[int, int, int | None]:
    """(rank, world size, local rank) of this process: the caller's process group's when one is
    initialised (train() from code that made its own), else torchrun's RANK / WORLD_SIZE /
    LOCAL_RANK / LOCAL_WORLD_SIZE, checked (local rank None: LOCAL_RANK not set). Taken from the environment alone, a caller's 2-rank group
    without them ran as two rank 0s of 1 (both locking the run dir, each reading all the data), and a
    RANK without WORLD_SIZE failed later with a TypeError."""
    rank, world, local_rank, local_world = map(_env_int, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    if dist.is_available() and dist.is_initialized():
        group = (dist.get_rank(), dist.get_world_size())
        if (rank is not None and rank != group[0]) or (world is not None and world != group[1]):
            raise ConfigError(f"the environment's RANK={rank} WORLD_SIZE={world} disagree with the initialised process "
                              f"group (rank {group[0]} of {group[1]}): unset them or make them match")
        rank, world = group
    elif rank is None and (world or 1) > 1:
        raise ConfigError(f"WORLD_SIZE is {world} but RANK is not set: launch with torchrun (it sets both), or unset "
                          "WORLD_SIZE to run one process")
    elif world is None and rank:
        raise ConfigError(f"RANK is {rank} but WORLD_SIZE is not set: launch with torchrun (it sets both), or unset "
                          "RANK to run one process")
    rank, world = rank or 0, world or 1
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} WORLD_SIZE={world}: expected WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    local = local_rank or 0
    if local < 0 or local_world is not None and not (0 < local_world <= world and local < local_world):
        raise ConfigError(f"LOCAL_RANK={local} LOCAL_WORLD_SIZE={local_world} (WORLD_SIZE={world}): expected "
                          "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE")
    return rank, world, local_rank


def setup_distributed(cfg: Config) -> Env:
    """The process group (under torchrun) and this process's device."""
    rank, world, local_rank = process_coords()
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but torch sees no CUDA device")
    if local_rank is None:
        # Without torchrun's LOCAL_RANK, 0; in a caller's own process group (mp.spawn and init_process_group)
        # on CUDA, the GPU its caller chose (torch.cuda.set_device): cuda:0 put every rank on one GPU,
        # overriding that choice (NCCL: "Duplicate GPU detected").
        caller_group = want == "cuda" and dist.is_available() and dist.is_initialized()
        local_rank = torch.cuda.current_device() if caller_group else 0
    device = torch.device("cuda", local_rank) if want == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        from fmcore.train.parallel import check_layout

        check_layout(cfg.parallel.data, cfg.parallel.tensor, world, cfg.train.precision, cfg.parallel.replicate)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=cfg.parallel.timeout_s))
    return Env(rank, world, local_rank, device)


def check_same_config(cfg: Config) -> None:
    """Every rank's model, optimizer, schedule, train, checkpoint and parallel settings, against each other's. Ranks
    started with different arguments (or nodes reading different TOML files) built different models and
    aborted in a collective whose sizes disagreed (zero1, fsdp2 on gloo: "terminate called after throwing
    an instance of 'gloo::EnforceNotMet' ... Received data size doesn't match"), or, given other
    train.steps or checkpoint.every, waited parallel.timeout_s in a collective the other never joined,
    naming no setting. Not compared: model.init_from and the data and log sections (paths, which may
    differ between nodes' mounts), checkpoint.resume (rank 0 reads it) and train.threads (each machine's
    cores)."""
    mine = {f"{section}.{key}": value for section in ("model", "optim", "schedule", "train", "checkpoint", "parallel")
            for key, value in dataclasses.asdict(getattr(cfg, section)).items()
            if f"{section}.{key}" not in ("model.init_from", "train.threads", "checkpoint.resume")}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        for key, value in mine.items():
            if theirs[key] != value:
                raise ConfigError(f"{key} is {theirs[key]!r} on rank {rank} but {value!r} on rank "
                                  f"{dist.get_rank()}: every rank must run the same config")


def resolve_precision(cfg: Config, device: torch.device, impl: str) -> str:
    p = cfg.train.precision
    if p == "auto":
        p = "bf16-autocast" if device.type == "cuda" else "fp32"
    if p == "bf16" and impl != "fmcore":
        raise ConfigError("train.precision 'bf16' (bf16 weights + fp32 master weights) needs optim.impl 'fmcore' "
                          "(FusedAdamW master_weights); use 'bf16-autocast' with torch.optim.AdamW")
    return p


def build_model(cfg: Config, vocab_size: int, env: Env, precision: str,
                fresh: bool = True) -> tuple[nn.Module, ModelConfig]:
    """(the model as it trains, parallelised as cfg.parallel asks, on env.device; its resolved
    ModelConfig). Built on the meta device and sharded there (tensor parallelism, fsdp2), then each
    rank allocates and fills its own shards only: no rank holds the whole model unless its layout
    keeps it whole. The initial weights are drawn from train.seed on the CPU (CausalLM.initial_weights:
    each rank draws the rows its shards hold), so they do not depend on the device, the ops path or
    the layout; in a fresh run with model.init_from, that checkpoint's. fresh=False (a resume, whose
    checkpoint then loads every parameter): the parameters are allocated, not drawn."""
    mcfg = models.resolve(cfg.model, vocab_size, env.device)
    model = models.build_model(mcfg, device="meta")
    if precision == "bf16":
        for p in model.parameters():  # parameters only: RoPE tables stay fp32
            p.data = p.data.to(torch.bfloat16)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    # (now, with the model's own names: tensor parallelism splits the fused projections' names)
    weights = None
    if fresh:
        weights = (init_from.weights(model, mcfg, mcfg.init_from) if mcfg.init_from
                   else model.initial_weights(cfg.train.seed))
    materialize = functools.partial(models.materialize, device=env.device, weights=weights)
    if cfg.parallel.data == "none" and cfg.parallel.tensor == 1:
        materialize(model)
        return model, mcfg
    from fmcore.train.parallel import apply_parallelism

    return apply_parallelism(model, cfg, precision, env.device, materialize), mcfg


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Weight decay on matrices; none on embeddings, norm weights and biases unless configured."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if isinstance(module, nn.Embedding):
                (decay if cfg.optim.decay_embeddings else no_decay).append(p)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name == "bias" or p.dim() < 2:
                (decay if cfg.optim.decay_norms_biases else no_decay).append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def optimizer_impl(cfg: Config, mcfg) -> str:
    return mcfg.ops if cfg.optim.impl == "auto" else cfg.optim.impl


def build_optimizer(model: nn.Module, cfg: Config, impl: str, precision: str, device: torch.device):
    """FusedAdamW (clipping and the non-finite skip fused into its step) or torch.optim.AdamW."""
    o = cfg.optim
    groups = param_groups(model, cfg)
    if cfg.parallel.data == "zero1":
        from fmcore.train import parallel

        return parallel.build_optimizer(groups, cfg, impl, device, model)
    if cfg.parallel.tensor > 1:
        from fmcore.train import parallel

        groups = parallel.split_param_groups(groups)
    if impl == "fmcore":
        from fmcore.optim import FusedAdamW

        # DTensor params (fsdp2, tensor parallel): a fused norm would be one rank's; train_step clips
        # the global norm (parallel.clip_grad_norm_) and skips non-finite steps before step().
        fused_norm = cfg.parallel.data != "fsdp2" and cfg.parallel.tensor == 1
        return FusedAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                          max_grad_norm=o.grad_clip if o.grad_clip > 0 and fused_norm else None,
                          master_weights=precision == "bf16", skip_nonfinite=fused_norm)
    if device.type == "cuda":
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)


def open_dataset(cfg: Config, env: Env) -> Path | list[tuple[Path, float]]:
    """data.dataset, data.mix's [(directory, weight)] (fmcore.data.Loader's blend), or the embedded corpus
    (rank 0 prepares it once; the others wait)."""
    from fmcore.data import default_dataset

    if cfg.data.mix:
        blend = [(Path(path), weight) for path, weight in parse_mix(cfg.data.mix)]
        for path, _ in blend:
            if not path.is_dir():
                raise ConfigError(f"data.mix: {path} is not a directory (make one with `fmcore prepare`)")
        return blend
    if cfg.data.dataset:
        path = Path(cfg.data.dataset)
        if not path.is_dir():
            raise ConfigError(f"data.dataset: {path} is not a directory (make one with `fmcore prepare`)")
        return path
    if env.main:
        path = default_dataset()
    if env.world > 1:
        dist.barrier()
    return path if env.main else default_dataset()


def make_loader(cfg: Config, dataset: Path, env: Env, split: str = "train", mode: str | None = None,
                batch_size: int | None = None):
    from fmcore.data import Loader
    from fmcore.train.parallel import data_parallel_coords

    # A tensor-parallel group reads the same batches: the loader is sharded by data-parallel rank.
    # check_vocab (one compare per token read): a corrupt token id would otherwise index past the
    # embedding, a device-side assert on the GPU; it is a data error naming the file and offset.
    # data.threads = 0 is the config's "let the loader choose": the Loader's threads=None (its 0 is an error).
    dp_rank, dp_world = data_parallel_coords(env.rank, env.world, cfg.parallel.tensor)
    return Loader(dataset, split=split, batch_size=batch_size or cfg.train.batch_size, seq_len=cfg.train.seq_len,
                  mode=mode or cfg.data.mode, seed=cfg.train.seed, rank=dp_rank, world_size=dp_world,
                  threads=cfg.data.threads or None, doc_boundaries=cfg.data.doc_boundaries, check_vocab=True)


# ---- every rank, one answer

def _from_main(fn, env: Env):
    """fn() run on rank 0, its result (or its ConfigError, raised again) handed to every rank: the
    others would otherwise wait in the broadcast until rank 0's exit breaks it with a gloo/NCCL error."""
    result = None
    if env.main:
        try:
            result = ("ok", fn())
        except ConfigError as e:
            result = ("error", str(e))
    if env.world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if result[0] == "error":
        raise ConfigError(result[1])
    return result[1]


# ---- the loop's helpers

def autocast_context(precision: str, device: torch.device):
    if precision == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def grad_sync(model: nn.Module, optimizer, last: bool):
    """Skip the data-parallel gradient reduction on all but the last micro-batch of a step (DDP, ZeroAdamW:
    their gradients are whole on every rank anyway). FSDP2 reduce-scatters every micro-batch's (torchtitan
    does too): without the sync it would keep each rank's gradients of the whole model, unsharded, until
    the last micro-batch, the memory fsdp2 is chosen to save (plan-memory counts shards)."""
    if not last:
        for owner in (model, optimizer):  # DDP; ZeroAdamW (its reduce-scatters start in the backward)
            if hasattr(owner, "no_sync"):
                return owner.no_sync()
    return contextlib.nullcontext()


def peak_tflops(cfg: Config, device: torch.device) -> float | None:
    """Peak dense bf16 TFLOP/s of one device for MFU (log.peak_tflops overrides the table)."""
    if cfg.log.peak_tflops > 0:
        return cfg.log.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # (the first key the name contains: the H100's PCIe and NVL boards before the SXM one)
    for key, tflops in (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                        ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0),
                        ("A10G", 70.0)):
        if key in name:
            return tflops
    return None


def memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def to_device(batch, device: torch.device, doc_boundaries: bool) -> tuple:
    """(x, y, positions, cu_seqlens, max_seqlen) on device; the last three None without doc_boundaries."""
    nb = device.type == "cuda"
    x, y = batch.x.to(device, non_blocking=nb), batch.y.to(device, non_blocking=nb)
    if not doc_boundaries:
        return x, y, None, None, None
    return (x, y, batch.positions.to(device, non_blocking=nb), batch.cu_seqlens.to(device, non_blocking=nb),
            batch.max_seqlen)


@dataclass
class StepOptions:
    impl: str  # "fmcore" (FusedAdamW) or "torch" (torch.optim.AdamW)
    precision: str  # resolved: fp32, bf16-autocast, bf16, fp16
    device: torch.device
    grad_clip: float  # 0: no clipping
    world: int = 1
    # The gradients are DTensor shards (fsdp2, tensor) or averaged inside the step (zero1): the norm is
    # computed across ranks by fmcore.train.parallel.clip_grad_norm_ before the step.
    global_norm: bool = False


def train_step(model: nn.Module, optimizer, next_batch, accum: int, opts: StepOptions,
               scaler: torch.amp.GradScaler | None = None) -> tuple[float, float, bool]:
    """One optimizer step over ``accum`` micro-batches from next_batch() -> (x, y, positions, cu_seqlens,
    max_seqlen). Returns (mean loss, gradient norm, whether the update was applied), read with one
    host sync. The caller sets the lr beforehand."""
    loss_sum = torch.zeros((), device=opts.device)
    for micro in range(accum):
        x, y, *docs = next_batch()
        # The backward too: ZeroAdamW's reduce-scatters start from hooks inside it.
        with grad_sync(model, optimizer, micro == accum - 1):
            with autocast_context(opts.precision, opts.device):
                loss = model(x, y, *docs)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach()
    if opts.world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if opts.impl == "torch" or opts.global_norm:
        # Norm (and clip) before deciding: torch.optim.AdamW would apply non-finite gradients.
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = opts.grad_clip if opts.grad_clip > 0 else math.inf
        if opts.global_norm:
            from fmcore.train.parallel import clip_grad_norm_

            norm = clip_grad_norm_(params, max_norm, optimizer)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=opts.device.type == "cuda" or None)
        loss_v, norm_v = torch.stack([loss_sum / accum, norm.float()]).tolist()
        good = math.isfinite(loss_v) and math.isfinite(norm_v)
        if good or scaler is not None:  # the scaler skips overflowed steps itself and lowers its scale
            scaler.step(optimizer) if scaler is not None else optimizer.step()
    else:
        # FusedAdamW computes the norm, clips and skips non-finite gradients inside its step (no sync).
        # A non-finite cross-entropy comes from a non-finite logit, whose gradient is NaN, so the
        # optimizer skips those steps too; the sync below only counts them. Not scaler.step: on an fp16
        # overflow it skipped the step without running it, so last_grad_norm was the previous step's (0
        # at the first) and the skipped step counted as good; the gradients are unscaled already, and
        # scaler.update() reads the overflow unscale_ found.
        optimizer.step()
        loss_v, norm_v = torch.stack([loss_sum / accum, optimizer.last_grad_norm.float().reshape(())]).tolist()
        good = math.isfinite(loss_v) and math.isfinite(norm_v)
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_v, norm_v, good


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, dataset, env: Env, precision: str) -> tuple[float, torch.Tensor]:
    """(mean val loss over train.eval_batches micro-batches of every rank, at most one pass over the val
    split, the first batch's x). dataset: a directory or a blend's [(directory, weight)] (then one pass
    is until every source's val split was read whole)."""
    from fmcore.train.parallel import data_parallel_coords

    was_training = model.training
    model.eval()
    total, first = torch.zeros((), device=env.device, dtype=torch.float64), None
    dp_rank, dp_world = data_parallel_coords(env.rank, env.world, cfg.parallel.tensor)
    loader = make_loader(cfg, dataset, env, split="val", mode="sequential")
    if not loader.batches_per_epoch:
        # A val split of fewer windows than one batch of every rank: the loader wrapped around inside every
        # batch, and eval_batches of them read it many times over, some windows once more than others
        # (gpt2-124m on 8 GPUs, 20 batches of 16 x 1024, read 2,560 windows from the embedded corpus's val
        # split of ~45k tokens). One batch per rank, as large as one pass allows, instead.
        windows = loader.windows_per_epoch
        loader.close()
        loader = make_loader(cfg, dataset, env, split="val", mode="sequential",
                             batch_size=max(1, windows // dp_world))
    # With fewer windows than data-parallel ranks, the ranks past them read a window again: they run the
    # model (fsdp2 and tensor parallelism need every rank in its collectives) but their loss is not counted.
    counted = min(dp_world, loader.windows_per_epoch)
    with loader:
        # The sequential loader wraps around: past one pass, the first batches were counted twice and the
        # "val loss" weighted some val tokens more than others (the embedded corpus holds 22 val batches of
        # 16x128: at eval_batches 30, 8 of them counted twice). batches_per_epoch is the same on every rank.
        n = min(cfg.train.eval_batches, max(1, loader.batches_per_epoch))
        for _ in range(n):
            x, y, *docs = to_device(next(loader), env.device, cfg.data.doc_boundaries)
            first = x if first is None else first
            with autocast_context(precision, env.device):
                loss = model(x, y, *docs).double()
            if dp_rank < counted:
                total += loss
    if env.world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return total.item() / (n * counted * cfg.parallel.tensor), first


@torch.no_grad()
def greedy_sample(model: nn.Module, prompt: torch.Tensor, n_new: int, precision: str, max_len: int) -> list[int]:
    """Greedy continuation of prompt (1, P). The input is always (1, P + n_new), right-padded: causal
    attention makes the padding invisible to the positions that matter, and one shape means one graph
    under torch.compile. The window must fit the model's max_len positions: the prompt is kept (its
    last max_len - 1 tokens) and fewer tokens are generated, as transformers' generate(max_length=)
    does; cutting the prompt instead would continue a prompt other than the one the sample shows."""
    if max_len < 2:  # no room for a prompt token and one more (prompt[:, -0:] is the whole prompt)
        return []
    was_training = model.training
    model.eval()
    P = min(prompt.shape[1], max_len - 1)
    n_new = min(n_new, max_len - P)
    ids = torch.zeros(1, P + n_new, dtype=prompt.dtype, device=prompt.device)
    ids[:, :P] = prompt[:, -P:]
    for i in range(P, P + n_new):
        with autocast_context(precision, prompt.device):
            logits = model(ids)
        ids[0, i] = logits[0, i - 1].argmax()
    model.train(was_training)
    return ids[0, P:].tolist()


def decode(tokenizer_path: Path | None, ids: list[int]) -> str:
    if tokenizer_path is None or not tokenizer_path.is_file():
        return " ".join(map(str, ids))
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path)).decode(ids)


def dataset_dirs(dataset) -> list[Path]:
    """The directories of a dataset: itself, or a blend's (data.mix) in order."""
    return [dataset] if isinstance(dataset, Path) else [path for path, _ in dataset]


def dataset_tokenizer(dataset) -> Path | None:
    """The dataset's tokenizer file (a blend's first source's: every source has the same tokenizer);
    ShardError when it is not the one the shards were tokenized with."""
    from fmcore.data.shards import dataset_tokenizer_file, load_manifest

    dataset = dataset_dirs(dataset)[0]
    return dataset_tokenizer_file(dataset, load_manifest(dataset))


def make_room_to_compile(model: nn.Module, graphs_per_run: int) -> None:
    """Empties torch.compile's cache of a forward of model's classes that this run's graphs would overflow.
    Dynamo caches per code object: CausalLM.forward's (PreNormBlock.forward's, compiling the blocks) is
    shared by every model train() builds in this process, and a run adds up to graphs_per_run entries
    (GRAPHS_PER_RUN). A sweep over model configs in one process (a notebook) reached dynamo's
    recompile_limit (8) on its third config; every later run then trained uncompiled, with one warning
    from torch. While there is room the entries stay: a run of a config already compiled (an lr sweep)
    reuses its graphs."""
    try:  # (private: a torch without them keeps its own behaviour, a warning at the limit)
        from torch._dynamo import config, reset_code
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return

    for code in {type(m).forward.__code__ for m in model.modules()}:
        if len(_debug_get_cache_entry_list(code)) + graphs_per_run > config.recompile_limit:
            reset_code(code)


# The most entries one run adds to the cache of a compiled code object. "model": CausalLM.forward's graphs
# for training, evaluation (no grad) and sampling (another shape). "blocks": PreNormBlock.forward's, as
# many for each kind of block call: 6 on the fmcore path (its first block's residual is None, the others'
# a tensor), 3 on the torch path, 7 with every-N-th checkpointing ("full" and "none" blocks in training).
GRAPHS_PER_RUN = {"model": 3, "blocks": 7}


def compile_model(model: nn.Module, raw_model: nn.Module, mode: str) -> None:
    """torch.compile, in place, as train.compile says: "model" the whole forward (of the data-parallel
    wrapper, if any), "blocks" each of raw_model's blocks (the embedding, final norm and loss stay eager:
    on the fmcore path they are a lookup and fused kernels already; compiled too, they made the first step
    longer and the others no faster on the CPU). "none" leaves the model as it is.

    nn.Module.compile traces at the first call, so the order of the wrapping before it does not matter,
    only what sits where at that call: as in torchtitan, tensor parallelism's layers and activation
    checkpointing (PreNormBlock.forward) inside each block's graph, FSDP2's per-block hooks around it.
    The blocks share their code and differ in their parameters, which dynamo passes as graph inputs:
    one graph (two on the fmcore path) serves every block, whatever model.n_layers."""
    if mode == "none":
        return
    make_room_to_compile(model, GRAPHS_PER_RUN[mode])
    if mode == "model":
        model.compile()
    else:
        for block in raw_model.blocks:
            block.compile()


def dataset_has_split(dataset, split: str) -> bool:
    """Whether the dataset (every source of a blend) has the split."""
    from fmcore.data import Loader

    return all(split in (Loader.manifest(path).get("splits") or {}) for path in dataset_dirs(dataset))


def grad_accumulation(cfg: Config, env: Env) -> tuple[int, int]:
    """(micro-batches per optimizer step, tokens per step): train.tokens_per_step over the tokens one
    micro-batch of every data-parallel rank holds (1 micro-batch without tokens_per_step)."""
    t, dp = cfg.train, env.world // cfg.parallel.tensor
    micro_tokens = t.batch_size * t.seq_len * dp
    if t.tokens_per_step and t.tokens_per_step % micro_tokens:
        # The factors and the nearest values: a value tuned for another number of GPUs (a preset's for 8, run
        # on 6) was refused with the product alone, which names neither this run's process count nor a fix.
        below = t.tokens_per_step // micro_tokens * micro_tokens
        nearest = f"{below} and {below + micro_tokens}" if below else f"{micro_tokens}"
        raise ConfigError(f"train.tokens_per_step ({t.tokens_per_step}) must be a multiple of train.batch_size * "
                          f"train.seq_len * data-parallel processes ({t.batch_size} * {t.seq_len} * {dp} = "
                          f"{micro_tokens}): the nearest {'are' if below else 'is'} {nearest}")
    accum = max(1, t.tokens_per_step // micro_tokens) if t.tokens_per_step else 1
    return accum, accum * micro_tokens


def why_no_eval(cfg: Config, dataset: Path, env: Env) -> str:
    """Why evaluation is off ("has no val split", naming the rank where only some lack it), or "" when
    every rank can read the val split. Collective: every rank calls it. Checked before the first step,
    not at the first evaluation: a val split the loader cannot read would lose the run's end."""
    why = None if dataset_has_split(dataset, "val") else ("has no val split", "")  # (reason, detail)
    if why is None:
        try:
            make_loader(cfg, dataset, env, split="val", mode="sequential").close()
        except ShardError as e:
            why = ("has a val split the loader cannot read", f" ({e})")
    # Every rank's answer: one that could not read it (its node's copy of the dataset damaged) skipped the
    # evaluations the others ran, whose collectives then waited on its training step's until
    # parallel.timeout_s failed every rank with a gloo/NCCL timeout naming neither the rank nor the split.
    # Gathered whether or not this rank's manifest lists a val split: one whose copy lists none skipped the
    # gather, and the others waited in it until that timeout.
    answers = [why] * env.world
    if env.world > 1:
        dist.all_gather_object(answers, why)
    failed = [(r, answer) for r, answer in enumerate(answers) if answer is not None]
    if not failed:
        return ""
    first_rank, (reason, detail) = failed[0]
    where = f" on rank {first_rank}" if len(failed) < env.world else ""
    return f"{reason}{where}{detail}"


@contextlib.contextmanager
def deterministic_mode():
    """torch's strict deterministic mode for one run (train.deterministic); the caller's mode after it."""
    # cuBLAS picks reduction orders by workspace; a fixed small workspace makes them repeatable (torch
    # raises in strict mode without it). Read when the first cuBLAS handle is created, and kept.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


# ---- the run

def train(cfg: Config) -> dict:
    """Run cfg to completion (or resume it); returns the summary dict. Raises TrainingStopped, OutOfMemory."""
    # A Config built or changed in code (a sweep's cfg.train.steps = ...) skipped load_config's checks:
    # log.every = 0 was a ZeroDivisionError after the model was built, a negative train.steps a run of nothing.
    # (model.init_from's shape too: config.toml and the checkpoints then record the model it describes.)
    cfg = init_from.configure(cfg)
    validate(cfg)
    # A notebook or a sweep calls train() again in the same process, after a run that ended or raised
    # (a KeyboardInterrupt too): what a run sets for itself (torch's thread count, strict determinism,
    # grad mode, the RNGs it seeds: a random search drawing from torch's RNG drew the same values after
    # every run) goes back to the caller's, and what it opens (the run dir's lock, the loader, the
    # progress bar, TensorBoard's writer thread, metrics.jsonl) is closed.
    with contextlib.ExitStack() as cleanup:
        # Last: torch's own reference cycles (DCP's state-dict closures, the compile wrapper) kept a run's
        # model and optimizer state until the next collection, into the next run of a sweep.
        cleanup.callback(gc.collect)
        env = setup_distributed(cfg)
        if env.world > 1:
            check_same_config(cfg)
        if env.world == 1 and not (dist.is_available() and dist.is_initialized()):
            # One process running fsdp2, zero1 or tensor parallelism initialises a 1-rank group of its own
            # (parallel.ensure_process_group): left behind, the caller's init_process_group raised
            # "trying to initialize the default process group twice".
            cleanup.callback(destroy_process_group)
            # init_process_group also wraps sys.excepthook (to prefix tracebacks with "[rank0]: "), which
            # destroy_process_group leaves: after n such runs the caller's tracebacks had n prefixes.
            cleanup.callback(setattr, sys, "excepthook", sys.excepthook)
        if torch.cuda.is_available():  # (the loader initialises CUDA anyway, for its pinned buffers)
            torch.cuda.init()  # now, so that rng_state() holds the caller's CUDA generators too
        cleanup.callback(checkpoint.set_rng_state, checkpoint.rng_state())
        if cfg.train.threads > 0:
            cleanup.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic:
            cleanup.enter_context(deterministic_mode())
        # Called under the caller's torch.no_grad() (a notebook's set_grad_enabled(False) for an earlier
        # evaluation), the first backward raised "element 0 of tensors does not require grad".
        cleanup.enter_context(torch.inference_mode(False))
        cleanup.enter_context(torch.enable_grad())
        dataset = open_dataset(cfg, env)
        run_dir, resume_from = _from_main(lambda: resume.choose_run_dir(cfg), env)
        fd = _from_main(lambda: resume.lock_run_dir(run_dir), env)  # through rank 0: its ConfigError reaches every rank
        if env.main:
            cleanup.callback(os.close, fd)
        loader = make_loader(cfg, dataset, env)
        cleanup.callback(loader.close)
        return _run(cfg, env, dataset, loader, run_dir, resume_from, cleanup)


def destroy_process_group() -> None:
    """The default process group, if initialised, and the trainer's DeviceMesh over it."""
    if dist.is_available() and dist.is_initialized():
        from fmcore.train import parallel

        parallel.forget_mesh()
        dist.destroy_process_group()


def _run(cfg: Config, env: Env, dataset: Path, loader, run_dir: Path, resume_from: Path | None,
         cleanup: contextlib.ExitStack) -> dict:
    t, ck = cfg.train, cfg.checkpoint
    accum, step_tokens = grad_accumulation(cfg, env)

    mcfg = models.resolve(cfg.model, loader.vocab_size, env.device)
    impl = optimizer_impl(cfg, mcfg)
    precision = resolve_precision(cfg, env.device, impl)
    model, mcfg = build_model(cfg, loader.vocab_size, env, precision, fresh=resume_from is None)
    raw_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = build_optimizer(model, cfg, impl, precision, env.device)
    scaler = None
    if precision == "fp16":
        from fmcore.train.parallel import GradScaler  # (torch's, for DTensor gradients too)

        scaler = GradScaler(env.device.type)
    flops_tok = models.flops_per_token(mcfg, t.seq_len)
    peak = peak_tflops(cfg, env.device)

    step, skipped_total, resumed_tokens, streak, resumed_wall = 0, 0, 0, 0, 0.0
    mix_changed = None
    if resume_from is not None:
        extra = checkpoint.read_extra(resume_from)
        resume.check_same_model(extra.get("config"), mcfg, loader.vocab_size, resume_from, extra.get("resolved_model"))
        resume.check_same_layout(resume_from, extra, cfg)
        resume.check_same_precision(resume_from, extra.get("config"), cfg, precision)
        # The checkpoint's param groups would bring back the hyperparameters it was written with: a
        # changed optim.weight_decay, betas or eps would be ignored while config.toml records it.
        hyper = [{k: g[k] for k in ("weight_decay", "betas", "eps") if k in g} for g in optimizer.param_groups]
        checkpoint.load(resume_from, model, optimizer)
        for group, values in zip(optimizer.param_groups, hyper):
            group.update(values)
        step, skipped_total, resumed_tokens = extra["step"], extra["skipped_total"], extra["tokens"]
        # The summary's wall_s is the run's, as its steps and tokens are: not the last segment's alone.
        resumed_wall = extra.get("wall_s", 0.0)
        # A streak of non-finite steps goes on across a resume (train.max_skipped counts it), except from
        # the checkpoint the stop itself wrote: resuming that one (with a lower lr, say) starts anew.
        streak = extra.get("nonfinite_streak", 0)
        streak = 0 if streak >= t.max_skipped else streak
        try:
            change = loader.load_state_dict(extra["loader"], mix_change=cfg.data.mix_change)
        except ValueError as e:  # another seed, data.mode, seq_len or dataset (or mix) than the checkpoint's
            raise ConfigError(f"checkpoint.resume {resume_from}: {e}; resume with the data settings it was "
                              "written with") from None
        if change:  # (logged once the report is open)
            mix_changed = f"data mix changes at sample {extra['loader']['sample']} (step {step}): {change}"
        if scaler is not None and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        checkpoint.set_rng_state(extra["rng"])
    compile_model(model, raw_model, compile_mode(t.compile))

    tokenizer = dataset_tokenizer(dataset)
    no_val_reason = why_no_eval(cfg, dataset, env)
    has_val = not no_val_reason
    set_aside = None
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            set_aside = resume.set_aside_later_checkpoints(run_dir, resume_from, step)
        (run_dir / "config.toml").write_text(to_toml(cfg))  # what was asked (reloads to the same Config)
        (run_dir / "resolved.json").write_text(json.dumps({  # what it became on this machine
            "model": dataclasses.asdict(mcfg), "precision": precision, "optimizer": impl, "device": str(env.device),
            "world_size": env.world, "grad_accum": accum, "tokens_per_step": step_tokens,
            "params": models.param_count(mcfg), "flops_per_token": flops_tok,
            "dataset": str(dataset) if isinstance(dataset, Path) else [[str(p), w] for p, w in dataset]},
            indent=1) + "\n")
    report = metrics.Reporter(run_dir, total_steps=t.steps, start_step=step, progress=cfg.log.progress,
                              tensorboard=cfg.log.tensorboard, enabled=env.main)
    cleanup.callback(report.close)
    n_params = models.param_count(mcfg)
    report.message(
        f"fmcore train {cfg.name}: {mcfg.arch} {n_params / 1e6:.2f}M params, ops={mcfg.ops}, optimizer={impl}, "
        f"precision={precision}, device={env.device}{f' x{env.world}' if env.world > 1 else ''}, "
        f"{step_tokens:,} tokens/step ({accum} micro-batches of {t.batch_size}x{t.seq_len}), "
        f"run dir {run_dir}" + (f", resumed from {resume_from.name}" if resume_from else "")
        + (f", weights from {mcfg.init_from}" if mcfg.init_from and not resume_from else ""))
    if cfg.schedule.warmup_steps > t.steps:
        # Not an error: a short smoke run (train.steps=20) of a preset with a longer warmup is common.
        # But its lr never reaches optim.lr and never decays, which the config alone does not show.
        reached = lr_at(t.steps - 1, t.steps, cfg.optim.lr, cfg.schedule)  # the last step's: still warming up
        report.message(f"warning: schedule.warmup_steps ({cfg.schedule.warmup_steps}) exceeds train.steps ({t.steps}): "
                       f"the lr warms up for the whole run and peaks at {reached:.3g} (optim.lr is {cfg.optim.lr:.3g}) "
                       "without decaying")
    if resume_from is not None and extra.get("tokens_per_step", step_tokens) != step_tokens:
        # Resumed on another number of processes with the same per-rank batch (or another batch_size): each
        # step now sees another number of tokens, as in torchtitan; said, since the curves change with it.
        report.message(f"note: {step_tokens:,} tokens per step, the checkpoint's run took {extra['tokens_per_step']:,}: "
                       "train.tokens_per_step (with gradient accumulation) keeps a global batch across world sizes")
    if set_aside:
        report.message(set_aside)
    if mix_changed:
        report.message(mix_changed)
    if mcfg.init_from and resume_from is None:
        mismatch = init_from.tokenizer_mismatch(Path(mcfg.init_from), tokenizer)
        if mismatch:
            report.message(f"warning: {mismatch}")
    if not has_val:
        report.message(f"{cfg.data.mix if cfg.data.mix else dataset} {no_val_reason}: evaluation is off")
    ckpt_dir = run_dir / "checkpoints"
    # checkpoint.async_save: the save being written in the background (at most one), the group its
    # collectives run on, and the end of the run, however it ends, waiting for it.
    pending: list[checkpoint.PendingSave] = []
    save_group = None
    if ck.async_save:
        save_group = checkpoint.background_group(cfg.parallel.timeout_s)
        cleanup.enter_context(checkpoint._quiet())  # (the single-process warning comes from the writing thread)
        cleanup.push(lambda *exc_info: finish_writing(exc_info[1]))

    def wait_for_pending() -> float:
        """Seconds spent waiting for the checkpoint being written, if any; raises its error (a CheckpointError,
        or what rank 0's rename or pruning raised)."""
        if not pending:
            return 0.0
        waited = time.perf_counter()
        try:
            pending[0].wait()
        finally:
            if pending[0].done():  # (its error raised once: not again on the way out; Ctrl-C leaves it pending)
                pending.clear()
        return time.perf_counter() - waited

    def finish_writing(exc: BaseException | None) -> None:
        if pending and not pending[0].done() and env.main:
            print(f"fmcore train: waiting for the checkpoint of step {pending[0].step} to be written (Ctrl-C again "
                  "abandons it)", file=sys.stderr, flush=True)
        error = None
        try:
            wait_for_pending()
        except KeyboardInterrupt:
            if pending:
                pending[0].abandon()
            raise  # (its thread may still use save_group: left to the default group's destruction)
        except Exception as e:  # noqa: BLE001 - raised below, or noted on what ended the run
            error = e
        if save_group is not None:
            dist.destroy_process_group(save_group)
        if error is not None:
            if exc is None:
                raise error
            # Not lost, and not hiding what ended the run (Python 3.10 has no add_note: printed there).
            if hasattr(exc, "add_note"):
                exc.add_note(f"and {error}")
            else:
                print(f"fmcore train: and {error}", file=sys.stderr, flush=True)

    def save(at_step: int) -> Path:
        waited = wait_for_pending()  # one save at a time
        if waited >= 1.0:
            report.message(f"waited {waited:.1f} s for the previous checkpoint to be written before saving step "
                           f"{at_step} (a save takes longer than checkpoint.every steps)")
        extra = {"step": at_step, "skipped_total": skipped_total, "nonfinite_streak": in_a_row,
                 "log_window": (window_loss, window_finite),
                 "tokens": resumed_tokens + (at_step - start) * step_tokens, "tokens_per_step": step_tokens,
                 "wall_s": resumed_wall + time.perf_counter() - run_t0,
                 "loader": loader.state_dict(), "rng": checkpoint.rng_state(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "config": to_dict(cfg),
                 "resolved_model": dataclasses.asdict(mcfg)}
        if cfg.parallel.data == "zero1":  # its buckets' layout, for a resume in another layout
            extra["zero1_buckets"] = relayout.zero1_layout(model, optimizer)
        if ck.async_save:
            pending.append(checkpoint.save_async(ckpt_dir, at_step, model, optimizer, extra, ck.keep_last,
                                                 ck.keep_every, save_group))
            return pending[0].path
        return checkpoint.save(ckpt_dir, at_step, model, optimizer, extra, ck.keep_last, ck.keep_every)

    def run_eval(at_step: int) -> None:
        if not has_val:
            return
        loss, first = evaluate(model, cfg, dataset, env, precision)
        record = {"step": at_step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        if len(loader.sources) > 1:
            # Each source's own val loss beside the blend's: forgetting shows on the replayed general data.
            for source in loader.sources:
                record[f"eval_loss/{source.name}"] = evaluate(model, cfg, source.path, env, precision)[0]
        report.log(record)
        if cfg.log.sample_tokens > 0:
            prompt = first[:1, : max(1, min(32, t.seq_len // 2))]
            out = greedy_sample(model, prompt, cfg.log.sample_tokens, precision, mcfg.max_seq_len)
            report.message(f"sample @ {at_step}: {decode(tokenizer, prompt[0].tolist())!r} -> {decode(tokenizer, out)!r}")

    opts = StepOptions(impl, precision, env.device, cfg.optim.grad_clip, env.world,
                       global_norm=cfg.parallel.data in ("fsdp2", "zero1") or cfg.parallel.tensor > 1)

    def next_batch():
        return to_device(next(loader), env.device, cfg.data.doc_boundaries)

    start, in_a_row = step, streak
    # The logging window: time, steps, loader wait and finite losses since the previous record. The
    # losses go on across a resume (with the records, from step 1 only in a fresh run), so that a
    # resumed run's loss_avg, and its loss curve, are the uninterrupted run's.
    window_t, window_steps, window_wait = time.perf_counter(), 0, loader.wait_seconds
    window_loss, window_finite = extra.get("log_window", (0.0, 0)) if resume_from is not None else (0.0, 0)
    # The last evaluation's and checkpoint's durations: the ETA adds those still to come (the final ones
    # too), else it counted training steps only and a run evaluating often ran for several times its ETA.
    pause_s = {"eval": 0.0, "save": 0.0}

    def eta_pauses(at: int) -> float:
        # Those of step `at` itself run after its record; the final ones at t.steps whatever the period.
        evals = (t.eval_every and (t.steps - 1) // t.eval_every - (at - 1) // t.eval_every) + has_val
        saves = (ck.every and (t.steps - 1) // ck.every - (at - 1) // ck.every) + ck.save_final
        return 0.0 if at == t.steps else evals * pause_s["eval"] + saves * pause_s["save"]

    if env.device.type == "cuda":  # the peak the records report is this run's (a sweep runs several)
        torch.cuda.reset_peak_memory_stats(env.device)
    # log.profile's window (after report's cleanup: a run ending inside it says where the trace went)
    profiler = cleanup.enter_context(StepProfiler(parse_profile(cfg.log.profile, t.steps), run_dir / "profile",
                                                  env.rank, env.device, report.message))
    run_t0 = time.perf_counter()
    model.train()
    while step < t.steps:
        lr = lr_at(step, t.steps, cfg.optim.lr, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            with profiler.step(step + 1):
                loss_v, norm_v, good = train_step(model, optimizer, next_batch, accum, opts, scaler)
        except torch.OutOfMemoryError as e:
            from fmcore.train.plan import out_of_memory_advice

            # (torch's first line: what it tried to allocate and what the GPU holds; its traceback is the step's)
            raise OutOfMemory(f"train step {step + 1}: {str(e).splitlines()[0]}\n"
                              + out_of_memory_advice(mcfg, cfg, env.world, precision)) from None
        step += 1
        window_steps += 1
        window_loss += loss_v if math.isfinite(loss_v) else 0.0
        window_finite += math.isfinite(loss_v)
        report.advance()
        # fp16 overflow with a finite loss is the loss scaler's business, not divergence.
        diverging = not math.isfinite(loss_v) or (not good and scaler is None)
        if not good:
            skipped_total += 1
        in_a_row = in_a_row + 1 if diverging else 0
        stop = in_a_row >= t.max_skipped

        if step % cfg.log.every == 0 or step == t.steps or step == 1 or stop:
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            now = time.perf_counter()
            dt = (now - window_t) / window_steps
            tok_s = step_tokens / dt
            report.log({
                "step": step, "loss": loss_v, "loss_avg": window_loss / window_finite if window_finite else None,
                "lr": lr, "grad_norm": norm_v, "tok_s": tok_s,
                "mfu": 100.0 * flops_tok * tok_s / (peak * 1e12 * env.world) if peak else None,
                "step_s": dt, "loader_wait_s": loader.wait_seconds - window_wait, "mem_mib": memory_mib(env.device),
                "skipped": skipped_total, "tokens": resumed_tokens + (step - start) * step_tokens,
                "eta_s": dt * (t.steps - step) + eta_pauses(step),
            })
            window_t, window_steps, window_wait = time.perf_counter(), 0, loader.wait_seconds
            window_loss, window_finite = 0.0, 0
        if stop:
            path = save(step)
            wait_for_pending()  # (the message says it is saved)
            report.message(f"stopping at step {step}: {in_a_row} steps in a row had a non-finite loss or gradient "
                           f"(last loss {loss_v}, grad norm {norm_v}); the weights are those of the last good step, "
                           f"saved in {path}. Lower optim.lr, raise optim.grad_clip or check the data, then "
                           f"--resume {path}.")
            report.close()
            raise TrainingStopped(f"{in_a_row} consecutive non-finite steps; checkpoint of the last good state: {path}")

        pause_t = time.perf_counter()
        profiler.write()  # (after the window's last step; its export is no training time either)
        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
            run_eval(step)
            pause_s["eval"] = time.perf_counter() - pause_t
        if ck.every and step % ck.every == 0 and step != t.steps:
            save_t = time.perf_counter()
            save(step)
            pause_s["save"] = time.perf_counter() - save_t
        window_t += time.perf_counter() - pause_t  # evaluation and checkpoint time is not training time

    elapsed = resumed_wall + time.perf_counter() - run_t0
    if ck.save_final and step > start:
        save(step)  # before the final evaluation: whatever happens there, the training is kept
    wait_for_pending()  # (there too)
    if step == start:
        report.message(f"nothing to do: the checkpoint is already at step {step} of {t.steps}")
        # A run killed between its final checkpoint and its final evaluation resumes here: without
        # this, its summary would give an earlier evaluation as the final one.
        if not _from_main(lambda: resume.evaluated_at(run_dir, step), env):
            run_eval(step)
    else:
        run_eval(step)
    if ck.export_hf:
        from fmcore.train.export import export_hf

        export_hf(raw_model, mcfg, run_dir / "hf", tokenizer=tokenizer, eos_id=getattr(loader, "eos_id", None),
                  bos_id=getattr(loader, "bos_id", None))
    out = {}
    if env.main:
        report.close()
        records = metrics.read_metrics(run_dir / "metrics.jsonl")
        png = metrics.plot_loss(records, run_dir / "loss.png", f"{cfg.name}: {mcfg.arch} {n_params / 1e6:.1f}M")
        out = metrics.summary(records, {
            "run_dir": str(run_dir), "steps": step, "params": n_params, "tokens_per_step": step_tokens,
            "skipped_steps": skipped_total, "wall_s": round(elapsed, 1), "loss_curve": str(png),
        })
        (run_dir / "summary.json").write_text(metrics.to_json(out, indent=1) + "\n")
        print(metrics.format_summary(out), flush=True)
    if env.world > 1:
        dist.barrier()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):  # anywhere: `fmcore train tiny --help` too
        print(__doc__)
        print(f"presets: {', '.join(presets())}\n")
        print(help_text())
        return 0
    source = argv.pop(0) if argv and not argv[0].startswith("--") else None
    # The process group train() initialises under torchrun is destroyed here; one the caller had
    # initialised before (main() called from their own code) stays theirs.
    owned_group = not (dist.is_available() and dist.is_initialized())
    # SIGINT raises KeyboardInterrupt as before, and is remembered: under torchrun every worker gets it,
    # and the one that ends first breaks the others' collectives, whose gloo/NCCL error ("Connection
    # closed by peer", as a traceback or a checkpoint error) can replace their own KeyboardInterrupt
    # (DCP, for one, catches it to gather the ranks' errors).
    sigints = []

    def on_sigint(signum, frame):
        sigints.append(signum)
        raise KeyboardInterrupt

    # (Not where SIGINT is ignored, as in a job started in the background with nohup or by a script.)
    own_handler = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if own_handler:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        try:
            cfg = load_config(source, argv)
            train(cfg)
        except BaseException:
            if sigints:
                raise KeyboardInterrupt from None
            raise
    except ConfigError as e:
        print(f"fmcore train: config error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:  # the dataset: missing, malformed, or not what the config asks
        print(f"fmcore train: data error: {e}", file=sys.stderr)
        return 2
    except checkpoint.CheckpointError as e:  # the checkpoint to resume
        print(f"fmcore train: checkpoint error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"fmcore train: stopped: {e}", file=sys.stderr)
        return 1
    except OutOfMemory as e:
        print(f"fmcore train: out of memory in {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C, or torchrun passing on its SIGINT to every worker: one line, not a traceback per rank.
        # The checkpoints are complete (atomic saves) and the run dir's lock is released: --resume auto
        # continues from the newest. 130 = 128 + SIGINT, the shell's convention.
        if os.environ.get("RANK", "0") == "0":
            print("fmcore train: interrupted; the run's complete checkpoints are kept: continue it with "
                  "--resume auto", file=sys.stderr)
        return 130
    finally:
        if owned_group:
            destroy_process_group()
        if own_handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0
