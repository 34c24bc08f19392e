"""`fmcore plan-memory CONFIG`: per-GPU memory of a training config in its parallel layout, before
running it, and against the measured peak of a run; and the bytes each GPU sends per optimizer step
(comm_bytes_per_step).

    fmcore plan-memory gpt2-124m --gpus 8 --parallel.data zero1
    fmcore plan-memory llama-1b --gpus 64 --parallel.data fsdp2 --parallel.tensor 2
    fmcore plan-memory llama-1b --gpus 32 --parallel.data fsdp2 --parallel.replicate 4   # HSDP: 4 x 8
    fmcore plan-memory --run runs/tiny              # the run as it ran, against its logged peak
    fmcore plan-memory tiny --run runs/tiny         # a config, against a run's logged peak

Model (bytes per parameter, per GPU; d = data-parallel degree, t = tensor-parallel degree, r = fsdp2's
replicas (parallel.replicate), k = d / r its shard degree; P_t =
the parameters on one tensor-parallel rank: the sharded projections' P_s / t plus the P - P_s that
tensor parallelism replicates, embeddings, head, norms and the row-parallel biases):
  params      P_t * w           w = 4 (fp32 weights: fp32, bf16-autocast, fp16) or 2 (bf16 weights)
  grads       P_t * w           same dtype as the weights
  optimizer   P_t * (8 + m)     AdamW moments in fp32, m = 4 when an fp32 master copy exists
  comm        DDP's and fmcore's gradient buckets (one more copy of the grads, P_t * w), ZeRO-1's flat
              gradient buffer (P_t * w) plus its shard's reduced gradient and all-gather send buffer
              (2 * P_t / d * w), and FSDP2's all-gather buffers (two layers of full params, in bf16
              under bf16 autocast, and the root module's embeddings, head and final norm in the
              weights' dtype, gathered for the whole forward and backward)
  fsdp2 divides params, grads and optimizer by k (d without hybrid sharding); zero1 divides the
  optimizer (moments and its fp32 master, which zero1 always keeps) by d.
  activations stored for the backward, per token of a micro-batch and per layer (16-bit under
  autocast, else 4 bytes per element; the residual stream in the weights' dtype, w bytes):
  train.activation_checkpointing "none": the two norms' inputs (w*dim each) and outputs, and GPT-2
  4*dim + 2*ffn, Llama q,k,v + rotated q,k + attention out + 3*ffn (4*ffn on the torch ops path)
  (+ q,k again with qk norm: the norm's input copy), plus attention's fp32 log-sum-exp (4 bytes per head); the parts inside the tensor-parallel region
  (all but the norms') divide by t.
  "full": each block's input (the stream, w*dim; on the fmcore path the previous MLP output too).
  "selective": the stream entering the block (w*dim) and the outputs of the matmuls and attention:
  GPT-2 q,k,v + attention out + ffn + 2*dim (the output projections), Llama q,k,v + attention out +
  2*ffn + 2*dim, plus the log-sum-exp; under tensor parallelism the output projections are partial
  sums, whole on every rank, and the fmcore path keeps the MLP's all-reduced output too (dim more;
  the attention's is recomputed: its all-reduce is sent again). Under bf16 autocast GPT-2 124M
  keeps 0.70x "none"'s bytes, Llama 1B 0.68x; "full" 0.24x and 0.21x (at t = 2: 0.77x and 0.76x;
  0.32x and 0.29x).
  "N" (every N-th block full): blocks 0, N, 2N, ... as "full", the others as "none". In every mode the
  last block counts as "none": the peak is its backward, which holds all of its activations
  (recomputed or stored). Plus the final norm's input, and the logits (fp32 logits and their
  gradient) on the torch ops path; fmcore's fused linear cross-entropy never materialises them.

These are lower bounds of what PyTorch's caching allocator reports: temporaries (the attention
kernel's workspace, the optimizer's foreach intermediates) and fragmentation come on top (typically
5-20%); compare with `--run` to calibrate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30


@dataclass
class Layout:
    data: str  # none | ddp | fsdp2 | zero1
    dp: int  # data-parallel degree
    tp: int  # tensor-parallel degree
    replicate: int = 1  # fsdp2's replicas (parallel.replicate): each shards over dp / replicate ranks

    @property
    def shard(self) -> int:
        """How many ranks split each parameter (fsdp2's shard group: dp / replicate)."""
        return self.dp // self.replicate


def _weight_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def _gathered_block_bytes(precision: str) -> int:
    """Bytes per parameter of fsdp2's all-gathered blocks: bf16 under bf16 autocast
    (fmcore.train.parallel.fsdp2_block_policy), else the weights' dtype."""
    return 2 if precision == "bf16-autocast" else _weight_bytes(precision)


def _act_bytes(precision: str) -> int:
    return 2 if precision in ("bf16-autocast", "bf16", "fp16") else 4


def _stored_per_layer(mcfg, a: int, s: int, tp: int) -> float:
    """Bytes per token that one block stores for the backward without checkpointing (see the module doc)."""
    d, f, H = mcfg.dim, mcfg.ffn_dim, mcfg.n_heads
    norms = 2 * d * s + 2 * d * a  # the two norms' inputs (the stream) and outputs
    if mcfg.arch == "gpt2":
        sharded = 4 * d + 2 * f  # q,k,v, attention out | the MLP's hidden before and after GELU
    else:
        hd = mcfg.head_dim or d // H
        qkv, rotated = (H + 2 * mcfg.n_kv_heads) * hd, (H + mcfg.n_kv_heads) * hd
        # fmcore's swiglu op keeps gate,up and its output; torch's silu(gate) * up the silu's output too;
        # qk norm keeps its input, a copy of q and k out of the fused projection (RoPE reads its output)
        sharded = qkv + rotated * (1 + mcfg.qk_norm) + H * hd + (3 if mcfg.ops == "fmcore" else 4) * f
    return norms + sharded * a / tp + 4 * H / tp  # + attention's fp32 log-sum-exp


def _selective_per_layer(mcfg, a: int, s: int, tp: int) -> float:
    """Bytes per token that one block keeps under selective checkpointing: the stream entering it, and
    the outputs of its matmuls and attention (models/checkpointing.py's saved_ops)."""
    d, f, H = mcfg.dim, mcfg.ffn_dim, mcfg.n_heads
    if mcfg.arch == "gpt2":
        sharded = 3 * d + d + f  # q,k,v | attention out | fc
    else:
        hd = mcfg.head_dim or d // H
        sharded = (H + 2 * mcfg.n_kv_heads) * hd + H * hd + 2 * f  # q,k,v | attention out | gate,up
    # The two output projections, whole on every tensor-parallel rank (partial sums there). Their
    # all-reduced sums are recomputed (sent again), but for the MLP's on the fmcore path, where it is
    # the next block's input beside the stream (without tensor parallelism it is the matmul's output).
    replicated = 2 * d + (d if tp > 1 and mcfg.ops == "fmcore" else 0)
    lse = 4 * H / tp  # attention's fp32 log-sum-exp per head
    return s * d + (replicated + sharded / tp) * a + lse


def activation_bytes_per_token(mcfg, precision: str, tp: int, checkpointing) -> float:
    """Bytes stored per token of a micro-batch for the backward, summed over layers (see the module doc).

    checkpointing: train.activation_checkpointing ("none", "full", "selective", "N", or a bool)."""
    from fmcore.train.config import checkpointing_mode
    from fmcore.train.models.checkpointing import block_mode

    mode = checkpointing_mode(checkpointing)
    L, d = mcfg.n_layers, mcfg.dim
    a, s = _act_bytes(precision), _weight_bytes(precision)  # activations | the residual stream (weights' dtype)
    stored = _stored_per_layer(mcfg, a, s, tp)
    # "full" keeps the block's inputs: the stream, and on the fmcore path the previous MLP's output apart
    # (its add happens in this block's first norm).
    full = s * d + (a * d if mcfg.ops == "fmcore" else 0)
    kept = {"none": stored, "full": full, "selective": _selective_per_layer(mcfg, a, s, tp)}
    per_block = [kept[block_mode(mode, i)] for i in range(L)]
    # The peak comes with the last block's backward: the blocks before it keep what they kept, and it
    # holds all of its activations (recomputed, or stored), which it frees before the next one's backward.
    return sum(per_block[:-1]) + stored + d * 4  # + the final norm's input


def tensor_parallel_sharded_count(mcfg) -> int:
    """Parameters that tensor parallelism shards (fmcore.train.parallel.apply_tensor_parallel): the
    column-parallel projections with their biases and the row-parallel projections' weights. The rest
    (embeddings, the head, norms, the row-parallel biases) is replicated on every tensor-parallel rank."""
    d, f, L = mcfg.dim, mcfg.ffn_dim, mcfg.n_layers
    if mcfg.arch == "gpt2":
        b = 1 if mcfg.bias else 0
        return L * ((3 * d * d + 3 * d * b) + d * d + (d * f + f * b) + f * d)
    hd = mcfg.head_dim or d // mcfg.n_heads
    qkv = (mcfg.n_heads + 2 * mcfg.n_kv_heads) * hd
    return L * (qkv * d + qkv * mcfg.qkv_bias + mcfg.n_heads * hd * d + 2 * d * f + f * d)


def plan(mcfg, layout: Layout, *, precision: str, batch_size: int, seq_len: int, checkpointing,
         optim_impl: str = "torch") -> dict[str, float]:
    """Per-GPU bytes by category for the resolved model config mcfg in the given layout."""
    from fmcore.train import models

    P = models.param_count(mcfg)
    w = _weight_bytes(precision)
    tp, dp = layout.tp, layout.dp
    sharded = tensor_parallel_sharded_count(mcfg) if tp > 1 else 0
    Pt = P - sharded + sharded / tp  # what one tensor-parallel rank holds
    master = 4 if precision == "bf16" or layout.data == "zero1" else 0
    out = {
        "params": Pt * w,
        "grads": Pt * w,
        "optimizer": Pt * (8 + master),
    }
    if layout.data == "fsdp2":
        out = {k: v / layout.shard for k, v in out.items()}
        # fully_shard(model) puts what is outside the blocks (embeddings, head, final norm) in the root
        # module's group: gathered at the forward's start, it stays gathered until the backward ends.
        root = models.param_count(dataclasses.replace(mcfg, n_layers=0))
        per_block = (Pt - root) / max(1, mcfg.n_layers)
        # + the gathered block and the next one, prefetched
        out["comm"] = root * w + 2 * per_block * _gathered_block_bytes(precision)
    elif layout.data == "zero1":
        out["optimizer"] /= dp
        # flat gradient buffer for the reduce-scatter, and per shard ZeroAdamW's reduced gradient and
        # the buffer it all-gathers the updated parameters from (both in the weights' dtype)
        out["comm"] = Pt * w + 2 * Pt / dp * w
    elif layout.data == "ddp":
        out["comm"] = Pt * w  # DDP's gradient buckets
    else:
        out["comm"] = 0.0
    tokens = batch_size * seq_len
    act = tokens * activation_bytes_per_token(mcfg, precision, tp, checkpointing)
    if mcfg.ops == "torch":
        act += 2 * tokens * mcfg.vocab_size * 4  # fp32 logits and their gradient
    out["activations"] = act
    out["total"] = sum(out.values())
    return out


def comm_bytes_per_step(P: int, layout: Layout, *, precision: str = "fp32", tokens_per_dp_rank: int = 0, mcfg=None,
                        act_bytes: int = 2, accum: int = 1) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step with ring collectives (a ring all-reduce of n bytes over
    k ranks sends 2(k-1)/k * n, a reduce-scatter or all-gather (k-1)/k * n), for train.precision
    precision (resolved: fp32, bf16-autocast, bf16 or fp16).

    Gradients and parameters travel in the weights' dtype (fp32, or bf16 for bf16 weights), but for
    fsdp2's blocks under bf16 autocast, all-gathered in bf16 (fsdp2_block_policy in parallel.py).
    ddp: all-reduce of the gradients. zero1: reduce-scatter of the gradients + all-gather of the
    updated parameters (the same bytes as ddp). fsdp2 (over k = dp / replicate ranks, the shard group;
    all of dp without hybrid sharding): all-gather of each block's parameters in the
    forward and again in the backward, the root module's (embeddings, head, final norm) once (FSDP2
    keeps them gathered until the backward ends), and reduce-scatter of the gradients: 1.3-1.5x ddp
    in one dtype, ddp's bytes under bf16 autocast, per micro-batch: with accum micro-batches a step
    (gradient accumulation) fsdp2 sends accum times that, ddp and zero1 the same bytes (they reduce
    once, after the last micro-batch; fsdp2 reduce-scatters each one's gradients into its shards, so
    that no rank ever holds the whole model's). Under hybrid sharding (replicate r > 1) each rank's
    gradient shard (P / k) is then all-reduced over the r replicas, per micro-batch too:
    2(r-1)/r * P/k * w, in "data" and apart as "replicas" (with a shard group per node, the only
    data-parallel bytes that cross nodes). With mcfg the parameters of one tensor-parallel
    rank and the root's are counted as plan() counts them; without it every parameter is a block's,
    divided by t. tensor parallel (t > 1): per layer two all-reduces of the (tokens, dim) activations
    in the forward and two in the backward (Megatron's f/g), on the tokens of this data-parallel rank."""
    from fmcore.train import models

    d, t = layout.dp, layout.tp
    if mcfg is not None:  # what one tensor-parallel rank holds, as plan() counts it
        sharded = tensor_parallel_sharded_count(mcfg) if t > 1 else 0
        Pt, root = P - sharded + sharded / t, models.param_count(dataclasses.replace(mcfg, n_layers=0))
    else:  # (without the model: every parameter in a block, divided by t)
        Pt, root = P / t, 0
    w = _weight_bytes(precision)

    def ring(k: int) -> float:  # what a reduce-scatter or all-gather over k ranks sends, per byte
        return (k - 1) / k

    out = {"data": 0.0, "replicas": 0.0, "tensor": 0.0}
    if layout.data in ("ddp", "zero1"):
        out["data"] = 2 * ring(d) * Pt * w
    elif layout.data == "fsdp2":
        k, r = layout.shard, layout.replicate
        gathered = 2 * (Pt - root) * _gathered_block_bytes(precision) + root * w
        out["replicas"] = accum * 2 * ring(r) * Pt / k * w  # all-reduce of this rank's gradient shard
        out["data"] = accum * (ring(k) * gathered + ring(k) * Pt * w) + out["replicas"]
    if t > 1 and mcfg is not None:
        out["tensor"] = 4 * mcfg.n_layers * 2 * (t - 1) / t * tokens_per_dp_rank * mcfg.dim * act_bytes
    out["total"] = out["data"] + out["tensor"]
    return out


def out_of_memory_advice(mcfg, cfg, world: int, precision: str) -> str:
    """What plan() says about a run that ran out of GPU memory, and the settings that lower it, each with
    its planned total per GPU: activation checkpointing, half the micro-batch (more of them a step), and a
    sharded layout. The trainer appends it to the out-of-memory error."""
    from fmcore.train.config import checkpointing_mode

    t, tp = cfg.train, cfg.parallel.tensor
    mode = checkpointing_mode(t.activation_checkpointing)

    def size(n: float) -> str:
        return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"

    def total(batch_size=t.batch_size, checkpointing=mode, data=cfg.parallel.data, replicate=cfg.parallel.replicate,
              part="total") -> str:
        layout = Layout(data, world // tp, tp, replicate if data == "fsdp2" else 1)
        return size(plan(mcfg, layout, precision=precision, batch_size=batch_size, seq_len=t.seq_len,
                         checkpointing=checkpointing)[part])

    lines = [f"plan-memory puts this run at {total()} per GPU (activations {total(part='activations')}, "
             f"micro-batches of {t.batch_size} x {t.seq_len}, activation checkpointing {mode}); to lower it:"]
    lighter = {"none": ("selective", "full"), "full": ()}.get(mode, ("full",))  # (selective, every N-th: full)
    if lighter:
        lines.append("  --train.activation_checkpointing " + ", ".join(f"{m} ({total(checkpointing=m)})" for m in lighter))
    if t.batch_size > 1:
        keep = (f"train.tokens_per_step ({t.tokens_per_step}) keeps the global batch" if t.tokens_per_step else
                f"with --train.tokens_per_step {t.batch_size * t.seq_len * (world // tp)} to keep the global batch")
        lines.append(f"  --train.batch_size {t.batch_size // 2} ({total(batch_size=t.batch_size // 2)}; {keep}, "
                     "in more micro-batches)")
    if world // tp > 1 and cfg.parallel.data in ("ddp", "none"):
        lines.append(f"  --parallel.data zero1 ({total(data='zero1')}) or fsdp2 ({total(data='fsdp2')})")
    elif world // tp > 1 and cfg.parallel.data == "zero1":
        lines.append(f"  --parallel.data fsdp2 ({total(data='fsdp2')})")
    elif cfg.parallel.replicate > 1:
        lines.append(f"  --parallel.replicate 1 ({total(replicate=1)}: fsdp2 over all {world // tp} data-parallel "
                     "GPUs, its all-gathers across the nodes)")
    if len(lines) == 1:
        lines[0] = lines[0].replace("to lower it:", "what lowers it now is a shorter train.seq_len, or more GPUs "
                                    "(fsdp2 divides the model's state by them) or --parallel.tensor N")
    return "\n".join(lines)


def run_resolution(run_dir: Path) -> dict | None:
    """What a run became on its machine (the trainer's resolved.json: model, precision, device,
    world_size), or None for a run dir without one."""
    path = Path(run_dir) / "resolved.json"
    return json.loads(path.read_text()) if path.is_file() else None


def measured_peak_mib(run_dir: Path) -> float | None:
    """The largest mem_mib the trainer logged in run_dir/metrics.jsonl (CUDA: max_memory_allocated)."""
    path = Path(run_dir) / "metrics.jsonl"  # (main checked that it is there)
    peaks = [rec["mem_mib"] for rec in map(json.loads, path.read_text().splitlines())
             if isinstance(rec.get("mem_mib"), (int, float))]
    return max(peaks) if peaks else None


def format_plan(parts: dict[str, float], measured_mib: float | None = None, measured_on_cpu: bool = False) -> str:
    lines = [f"  {k:<12} {v / GIB:10.3f} GiB" for k, v in parts.items() if k != "total"]
    lines.append(f"  {'total':<12} {parts['total'] / GIB:10.3f} GiB  (lower bound; allocator overhead on top)")
    if measured_mib is not None and measured_on_cpu:
        lines.append(f"  {'measured':<12} {measured_mib / 1024:10.3f} GiB  peak RSS of a CPU run's process (the "
                     f"Python runtime and libraries included: not comparable)")
    elif measured_mib is not None:
        ratio = measured_mib * 2**20 / parts["total"] if parts["total"] else math.nan
        lines.append(f"  {'measured':<12} {measured_mib / 1024:10.3f} GiB  peak of the run ({ratio:.2f}x the plan)")
    return "\n".join(lines)


def _dataset_vocab(dataset: str) -> int | None:
    if not dataset:  # the embedded corpus: its BPE's size is fixed, known without preparing it
        from fmcore.data.prepare import DEFAULT_RECIPE

        return DEFAULT_RECIPE["vocab_size"]
    if not Path(dataset).is_dir():
        return None
    from fmcore.data import Loader

    return (Loader.manifest(dataset).get("tokenizer") or {}).get("vocab_size")


def main(argv: list[str] | None = None) -> int:
    import torch

    from fmcore.train import models
    from fmcore.train.config import ConfigError, load_config, parse_mix
    from fmcore.train.parallel import check_layout, check_tensor_divides
    from fmcore.train.trainer import Env, grad_accumulation, optimizer_impl, resolve_precision

    parser = argparse.ArgumentParser(prog="fmcore plan-memory", description=__doc__,
                                     usage="fmcore plan-memory [CONFIG] [--gpus N] [--run DIR] [--vocab-size V] "
                                           "[--section.key value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=0,
                        help="total processes (default 1, or the --run's when no CONFIG is given)")
    parser.add_argument("--run", type=Path, default=None,
                        help="a run dir: compare with its measured peak; without CONFIG, plan that run as it "
                             "ran (its config, world size, device, precision and resolved model)")
    parser.add_argument("--vocab-size", type=int, default=50304,
                        help="vocabulary when the config takes the dataset's (model.vocab_size = 0) and "
                             "data.dataset names a directory this machine does not have (default 50304; an "
                             "empty data.dataset, the embedded corpus, has 4096)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # CONFIG (a preset or TOML file) comes first, as for `fmcore train`; as an argparse positional it
    # would take the value of an override it does not know (`--train.precision bf16`).
    config = argv.pop(0) if argv and not argv[0].startswith("-") else None
    args, overrides = parser.parse_known_args(argv)
    args.config = config
    if args.vocab_size < 1:  # (a negative one planned a model of negative parameters and GiB)
        print(f"fmcore plan-memory: --vocab-size: expected a vocabulary >= 1, got {args.vocab_size}")
        return 2
    if args.run is not None and not (args.run / "metrics.jsonl").is_file():
        print(f"fmcore plan-memory: --run {args.run} holds no metrics.jsonl: it takes a run directory written "
              f"by `fmcore train`")
        return 2
    try:
        cfg = load_config(args.config, overrides)
        run_info = run_resolution(args.run) if args.run is not None else None
        ran = None  # without CONFIG, the run's own config, its "auto" fields resolved as they were there
        if args.config is None and args.run is not None and (args.run / "config.toml").is_file():
            cfg, ran = load_config(str(args.run / "config.toml"), overrides), run_info
        device = "cuda" if cfg.train.device in ("auto", "cuda") else "cpu"
        if ran is not None and cfg.train.device == "auto":
            device = "cuda" if ran["device"].startswith("cuda") else "cpu"
        vocab = None
        if cfg.model.vocab_size == 0:  # the run's, or the dataset's when the config names one that exists
            # (a data.mix's sources share one tokenizer: its first directory's)
            dataset = parse_mix(cfg.data.mix)[0][0] if cfg.data.mix else cfg.data.dataset
            vocab = ran["model"]["vocab_size"] if ran else _dataset_vocab(dataset) or args.vocab_size
        ops = cfg.model.ops
        if ops == "auto":
            # A plan is for the GPU run, often made elsewhere: "auto" plans fmcore's kernels, as a
            # run on a GPU this build covers uses (not what this machine could run).
            ops = ran["model"]["ops"] if ran else "fmcore" if device == "cuda" else "auto"
        mcfg = models.resolve(dataclasses.replace(cfg.model, ops=ops), vocab, device)
        precision = cfg.train.precision
        if precision == "auto":
            precision = ran["precision"] if ran else "bf16-autocast" if device == "cuda" else "fp32"
    except ConfigError as e:
        print(f"fmcore plan-memory: config error: {e}")
        return 2
    if args.gpus < 0:
        print(f"fmcore plan-memory: --gpus: expected a number of processes >= 1 (0: one, or the --run's), "
              f"got {args.gpus}")
        return 2
    gpus = args.gpus or (ran["world_size"] if ran is not None else 1)
    tp = cfg.parallel.tensor
    try:  # what `fmcore train` refuses (tp not dividing gpus among it): a plan of it would only mislead
        check_layout(cfg.parallel.data, tp, gpus, precision, cfg.parallel.replicate)
        check_tensor_divides(tp, mcfg.arch, mcfg.n_heads, mcfg.n_kv_heads, mcfg.ffn_dim)
        resolve_precision(cfg, torch.device(device), optimizer_impl(cfg, mcfg))  # bf16 needs FusedAdamW
    except ConfigError as e:
        print(f"fmcore plan-memory: `fmcore train` refuses this config: {e}")
        return 2
    layout = Layout(cfg.parallel.data, gpus // tp, tp, cfg.parallel.replicate)
    try:  # (a train.tokens_per_step this many processes cannot make: refused as the trainer does)
        accum, _ = grad_accumulation(cfg, Env(0, gpus, 0, torch.device(device)))
    except ConfigError as e:
        print(f"fmcore plan-memory: `fmcore train` refuses this config: {e}")
        return 2
    parts = plan(mcfg, layout, precision=precision, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                 checkpointing=cfg.train.activation_checkpointing)
    measured = measured_peak_mib(args.run) if args.run is not None else None
    hybrid = f" ({layout.replicate} replicas sharded over {layout.shard})" if layout.replicate > 1 else ""
    print(f"{cfg.name}: {mcfg.arch} {models.param_count(mcfg) / 1e6:.1f}M params, precision {precision}, "
          f"micro-batch {cfg.train.batch_size}x{cfg.train.seq_len}, parallel.data={layout.data} "
          f"x{layout.dp}{hybrid}, parallel.tensor={tp}, ops={mcfg.ops}; per GPU:")
    print(format_plan(parts, measured, measured_on_cpu=run_info is not None and run_info["device"] == "cpu"))
    comm = comm_bytes_per_step(models.param_count(mcfg), layout, precision=precision, mcfg=mcfg, accum=accum,
                               tokens_per_dp_rank=accum * cfg.train.batch_size * cfg.train.seq_len,
                               act_bytes=_act_bytes(precision))
    across = f" ({comm['replicas'] / 1e9:.2f} GB of it across the replicas)" if layout.replicate > 1 else ""
    print(f"sent per GPU per optimizer step ({accum} micro-batch{'es' if accum > 1 else ''}; ring collectives): "
          f"{comm['data'] / 1e9:.2f} GB data-parallel{across}, {comm['tensor'] / 1e9:.2f} GB tensor-parallel")
    return 0
