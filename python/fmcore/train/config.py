"""The trainer's configuration: one dataclass tree, loaded from TOML, overridden from the command line.

    cfg = load_config("tiny", ["--optim.lr", "3e-3", "--train.steps=200"])

A source is a preset name shipped in fmcore/train/presets/ (``tiny``, ``gpt2-124m``, ...) or a path to a
TOML file whose tables are the sections below. Overrides are ``--section.key value`` or
``--section.key=value``. An unknown section or key, or a value of the wrong type, raises ConfigError
naming it. Each field's docstring (the string under it) is what ``fmcore train --help`` prints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclass
class ModelConfig:
    arch: str = "gpt2"
    """"gpt2" (LayerNorm, GELU, learned positions, biases) or "llama" (RMSNorm, SwiGLU, RoPE,
    grouped-query attention, no biases; Qwen2's q/k/v biases with model.qkv_bias, Qwen3's with
    model.qk_norm and model.head_dim). Either ties its head to the embedding unless
    model.tie_embeddings is false (the llama-1b preset unties it)."""
    ops: str = "auto"
    """"fmcore" (flash attention, RoPE op, fused linear cross-entropy), "torch" (SDPA, rotate-half,
    F.cross_entropy on materialised logits), or "auto": fmcore wherever its kernels run (every CPU,
    where the tiny preset's step is faster with them than with torch's: 87-92 against 120-124 ms on
    2 cores; a GPU whose architecture this build compiled), else torch with a warning saying why."""
    init_from: str = ""
    """A Hugging Face checkpoint directory to start from (continued pretraining): config.json plus
    model.safetensors, or shards with model.safetensors.index.json, of a GPT2LMHeadModel,
    LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (Qwen2, Qwen2.5) or Qwen3ForCausalLM (dense)
    (a sliding window in every layer or in none). Its config.json sets arch, vocab_size, dim, n_layers,
    n_heads, n_kv_heads, head_dim, ffn_dim, max_seq_len, rope_base, the rope_* scaling fields, norm_eps,
    tie_embeddings, bias, qkv_bias, qk_norm and sliding_window, over a preset's values; one your TOML file or command
    line set to another value is an error (0, "derive it", is not). What fmcore's models cannot compute
    exactly (an o_proj or MLP bias, another activation, a rope_scaling other than llama3, a mixture of
    experts...) is refused naming the config.json key. Dropout is
    ignored (fmcore trains without). A fresh run loads the weights before any sharding, in every
    parallel layout; a resume loads its checkpoint. Prepare the data with the checkpoint's tokenizer:
    `fmcore prepare ... --tokenizer DIR/tokenizer.json` (a vocabulary larger than the model's is an
    error, another tokenizer.json than DIR's a warning)."""
    vocab_size: int = 0
    """Embedding rows; 0 takes the dataset's vocabulary rounded up to a multiple of 64."""
    dim: int = 768
    """Hidden size."""
    n_layers: int = 12
    """Number of transformer blocks."""
    n_heads: int = 12
    """Query heads; the head dim is dim / n_heads unless model.head_dim sets it."""
    n_kv_heads: int = 0
    """Key/value heads (llama; must divide n_heads); 0 means n_heads."""
    head_dim: int = 0
    """Dimension of each attention head (llama); 0 means dim / n_heads. Set, dim need not be a
    multiple of n_heads: q, k and v have n_heads * head_dim and n_kv_heads * head_dim features
    (Qwen3-0.6B: dim 1024, 16 heads of 128). fmcore's flash attention runs head dims 64, 96 and 128
    on CUDA (any on the CPU); others take torch's SDPA there, with a warning."""
    ffn_dim: int = 0
    """MLP hidden size; 0 means 4*dim (gpt2) or 8/3*dim rounded up to a multiple of 256 (llama)."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts (size of the position table / RoPE cache)."""
    rope_base: float = 10000.0
    """RoPE frequency base (llama)."""
    rope_scaling: str = "none"
    """RoPE frequency scaling (llama): "none", or "llama3" (Llama 3.1/3.2's, as transformers computes
    it): wavelengths longer than rope_original_max_len / rope_low_freq_factor are stretched by
    rope_scale_factor, those shorter than rope_original_max_len / rope_high_freq_factor kept, and the
    ones between blended smoothly."""
    rope_scale_factor: float = 8.0
    """rope_scaling "llama3": the factor long wavelengths are stretched by (Llama 3.1: 8, 3.2: 32)."""
    rope_low_freq_factor: float = 1.0
    """rope_scaling "llama3": low_freq_factor."""
    rope_high_freq_factor: float = 4.0
    """rope_scaling "llama3": high_freq_factor."""
    rope_original_max_len: int = 8192
    """rope_scaling "llama3": original_max_position_embeddings, the context length the model was
    pretrained at before the scaling."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    bias: bool = True
    """Biases in the linear layers and LayerNorms (gpt2; llama has none, see model.qkv_bias)."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections, none on the attention's output or the MLP (llama;
    Qwen2 and Qwen2.5's attention)."""
    qk_norm: bool = False
    """RMSNorm over each head's head_dim features of q and of k, after the projection and before
    RoPE, with a weight of head_dim per norm and model.norm_eps (llama; Qwen3's attention)."""
    sliding_window: int = 0
    """Local attention in every layer (llama; Mistral's sliding window, as transformers computes it):
    each token attends to itself and the sliding_window - 1 tokens before it (in its document);
    0 means every earlier token. fmcore's kernel skips the key blocks outside the window."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections use init_std / sqrt(2 * n_layers)."""


@dataclass
class DataConfig:
    dataset: str = ""
    """Dataset directory written by `fmcore prepare`; empty means the embedded corpus
    (fmcore.data.default_dataset(), prepared on first use)."""
    mix: str = ""
    """A weighted blend of datasets instead of data.dataset: "DIR=WEIGHT,DIR=WEIGHT", e.g.
    "data/code=0.7,data/web=0.3" (continued pretraining on domain data with general data replayed).
    Weights are normalised; samples are blended per sample (fmcore.data.Loader); every directory needs
    the same tokenizer. Evaluation logs each source's val loss (eval_loss/<directory name>) beside the
    blended eval_loss. A weight may be 0 (a source evaluated but not trained on), one must be > 0."""
    mix_change: bool = False
    """Let checkpoint.resume change data.mix's weights (an annealing or mid-training phase on another mix):
    from the resumed step on, samples follow the new weights and each source continues where it left off (none of
    its samples repeated or skipped). The checkpoints keep every phase of the mix, so later resumes (with the new
    mix, without this flag) read the same data again. Without it, a resume with other weights is refused. The flag
    also lets the resume add sources after the checkpoint's (in their order; a data.dataset run may become a
    data.mix starting with it): each new source starts at its first sample. A source cannot be removed (weight 0
    stops reading it)."""
    mode: str = "random"
    """Loader order for training: "random" (seeded windows) or "sequential"."""
    doc_boundaries: bool = False
    """Mask attention at document boundaries (varlen attention / block-diagonal mask) and restart
    positions at each document."""
    threads: int = 0
    """Loader worker threads; 0 lets the loader choose (the trainer passes it as Loader(threads=None):
    the usable cores shared among the local ranks, at most 8)."""


@dataclass
class OptimConfig:
    impl: str = "auto"
    """"fmcore" (FusedAdamW), "torch" (torch.optim.AdamW, fused on CUDA, foreach on the CPU), or
    "auto": the same choice as model.ops."""
    lr: float = 6e-4
    """Peak learning rate."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices (see decay_embeddings / decay_norms_biases)."""
    decay_embeddings: bool = False
    """Also decay embedding tables (a tied embedding is the output head too)."""
    decay_norms_biases: bool = False
    """Also decay norm weights and biases."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""


@dataclass
class ScheduleConfig:
    kind: str = "cosine"
    """"cosine" (to min lr), "linear" (to min lr), "wsd" (warmup-stable-decay: constant, then a
    linear decay over the last decay_fraction of steps) or "constant"."""
    warmup_steps: int = 100
    """Linear warmup to the peak lr over this many steps (the first step gets peak / warmup_steps, not 0)."""
    min_lr_ratio: float = 0.1
    """The final lr as a fraction of optim.lr (cosine, linear and wsd; constant stays at the peak)."""
    decay_fraction: float = 0.2
    """WSD only: the fraction of all steps spent in the final decay."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to run."""
    batch_size: int = 8
    """Sequences per micro-batch on each process."""
    seq_len: int = 1024
    """Tokens per sequence."""
    tokens_per_step: int = 0
    """Global tokens per optimizer step; gradient accumulation makes up the difference (it must be a
    multiple of batch_size * seq_len * the data-parallel processes, world size / parallel.tensor).
    0 means one micro-batch per process."""
    precision: str = "auto"
    """"fp32", "bf16-autocast" (fp32 weights, bf16 compute), "bf16" (bf16 weights with fp32 master
    copies in FusedAdamW), "fp16" (autocast with a loss scaler), or "auto": bf16-autocast on CUDA,
    fp32 on the CPU."""
    device: str = "auto"
    """"cuda", "cpu" or "auto" (cuda when available)."""
    seed: int = 0
    """Seed for the init, the loader and every RNG."""
    deterministic: bool = False
    """Bitwise-reproducible runs on the GPU too: torch.use_deterministic_algorithms(True) (which also
    selects fmcore's deterministic attention backward, about 1.4x its tensor-core work) and
    deterministic cuBLAS workspaces. Some torch ops get slower. The CPU is deterministic already."""
    compile: str = "none"
    """torch.compile: "none", "model" (the whole forward as one graph), or "blocks" (each transformer
    block on its own, as torchtitan does: the blocks share their code, so dynamo compiles one graph
    for all of them and the compile time does not grow with model.n_layers (a 128-wide llama on 2 CPU
    cores: a first step of 17 and 16 s at 8 and 24 layers, "model"'s 18 and 28 s; the same step time);
    activation checkpointing inside each block's graph, data parallelism's wrappers around it; the
    embedding, final norm and loss, fmcore's fused kernels, stay eager). true and false (this key was a
    bool) mean "blocks" and "none"."""
    activation_checkpointing: str = "none"
    """Which activations of the blocks the backward recomputes instead of storing them: "none" (store
    all), "full" (keep each block's input, recompute the whole block: the least memory, one more
    forward of the blocks), "selective" (keep the outputs of the matmuls and attention, recompute the
    norms, RoPE, activations and elementwise ops, which are memory-bound: 0.70x (GPT-2 124M) and 0.68x
    (Llama 1B) of "none"'s activation memory under bf16 autocast, "full" 0.24x and 0.21x), or a
    number N: "full" for every N-th block (the first, the N+1-th, ...) and "none" for the others (1 is
    "full", 0 "none"). true and false (this key was a bool) mean "full" and "none". `fmcore
    plan-memory` estimates each."""
    eval_every: int = 0
    """Evaluate on the val split every this many steps (and at the end); 0 only at the end."""
    eval_batches: int = 8
    """Micro-batches per evaluation (per process), at most one pass over the val split."""
    max_skipped: int = 10
    """Stop (with a checkpoint of the last good state) after this many consecutive steps whose loss
    or gradient was not finite."""
    threads: int = 0
    """CPU threads for torch (torch.set_num_threads); 0 keeps torch's default."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many steps; 0 saves only at the end."""
    keep_last: int = 2
    """Keep the newest this many checkpoints (0: all)..."""
    keep_every: int = 0
    """...plus every checkpoint whose step is a multiple of this (0: none)."""
    resume: str = "none"
    """"none", "auto" (the newest complete checkpoint of this run, if any) or a checkpoint dir (the run
    goes on in log.run_dir when given, else in the run dir holding that checkpoint, or a fresh run's
    default run dir (see log.run_dir) for one in no run dir)."""
    save_final: bool = True
    """Save a checkpoint after the last step."""
    async_save: bool = False
    """Write checkpoints in the background: a save stops training only while each rank copies its model
    and optimizer state to CPU memory, which holds that copy until the write ends (the rank's share of
    the state: 12 bytes a parameter with fp32 weights and AdamW, 14 with bf16 ones). One save at a time: the
    next waits for it, and so do the end of the run and every way out of it (Ctrl-C again abandons it:
    never renamed, deleted by the next save). A failed write raises at the next save or at the end."""
    export_hf: bool = True
    """Write the final weights as safetensors + config.json that Hugging Face transformers loads."""


@dataclass
class LogConfig:
    run_dir: str = ""
    """Where the config, metrics, checkpoints and plots go; empty means runs/<name> (a fresh run takes
    runs/<name>-2, -3, ... when that holds a run)."""
    every: int = 10
    """Log metrics every this many steps."""
    progress: str = "auto"
    """"bar" (tqdm), "plain" (one line per log step), "none", or "auto": bar on a terminal."""
    tensorboard: bool = True
    """Also write TensorBoard events when tensorboard is installed."""
    sample_tokens: int = 0
    """At each evaluation, greedily decode this many tokens after a prompt from the val split."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU; 0 looks the GPU up (H100: 989 bf16), none on CPU. The
    metrics' mfu is the percentage of it that models.flops_per_token (6N + 12 L H Q T per token, PaLM's
    and nanoGPT's convention: no recompute, full S x S attention scores, S x W with a sliding window W)
    times tok/s makes."""
    profile: str = ""
    """A torch.profiler window over train steps "START:END" (START to END - 1, as in a Python range:
    "10:13" profiles steps 10, 11 and 12; "1:N+1" a whole run of N steps); empty: off. Each rank writes
    profile/rank<R>-steps<START>-<END>.json in the run dir, a Chrome trace for https://ui.perfetto.dev
    (CPU ops, and CUDA kernels on a GPU), and a .txt beside it: the top 20 ops by self time (device time
    on a GPU), which is what to read first. The trace runs from the first step's batch to the last
    one's optimizer step, so an evaluation or checkpoint due inside the window is in it too; the
    profiler slows the steps it records (their step_s and tok/s). A run that ends inside the window
    (an error, Ctrl-C) writes the steps it ran, a resume inside it the steps it runs (the file named
    after them), a resume past it nothing."""


@dataclass
class ParallelConfig:
    data: str = "none"
    """Data parallelism across processes: "none", "ddp", "fsdp2" or "zero1" (fmcore's own)."""
    tensor: int = 1
    """Tensor-parallel degree."""
    replicate: int = 1
    """Hybrid sharded data parallelism (HSDP), with data "fsdp2": the data-parallel processes (world
    size / tensor) form this many replicas, each sharding the model over its dp / replicate
    consecutive processes (one node: the all-gathers and reduce-scatters stay on its NVLink), the
    gradient shards all-reduced across the replicas. 1: plain fsdp2 over all of them."""
    timeout_s: float = 600.0
    """How long a collective waits for the other ranks before it fails the run (the process group's
    and zero1's NCCL communicator's timeout): a rank that hangs (a stuck device or file system) ends
    the job after this long, not after torch's default (gloo: 30 minutes). It must cover what rank 0
    does alone while the others wait: preparing the embedded corpus, renaming and pruning checkpoints."""


@dataclass
class Config:
    name: str = "run"
    """Name of the run (the default run dir is runs/<name>, see log.run_dir)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Not a field (neither in the TOML nor compared): "section.key" of each value the source TOML file or the
    # command line set, as load_config records it. A preset's values and the defaults are not the user's
    # choice: model.init_from's checkpoint replaces them silently and refuses a conflicting explicit one.
    explicit: typing.ClassVar[frozenset] = frozenset()


SECTIONS = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]
CHOICES = {
    ("model", "arch"): ("gpt2", "llama"),
    ("model", "ops"): ("auto", "fmcore", "torch"),
    ("model", "rope_scaling"): ("none", "llama3"),
    ("data", "mode"): ("random", "sequential"),
    ("optim", "impl"): ("auto", "fmcore", "torch"),
    ("schedule", "kind"): ("cosine", "linear", "wsd", "constant"),
    ("train", "precision"): ("auto", "fp32", "bf16-autocast", "bf16", "fp16"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("log", "progress"): ("auto", "bar", "plain", "none"),
    ("parallel", "data"): ("none", "ddp", "fsdp2", "zero1"),
}


def presets() -> list[str]:
    """Names of the presets shipped with the package."""
    files = resources.files("fmcore.train") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in files.iterdir() if p.name.endswith(".toml"))


def _convert(value, typ: type, key: str):
    """value (a TOML value or a command-line string) as typ, or ConfigError naming key."""
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        try:
            if typ is bool:
                low = text.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            if typ is int:
                return int(float(text)) if ("e" in text.lower() and float(text).is_integer()) else int(text)
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


CHECKPOINTING_MODES = ("none", "full", "selective")


def checkpointing_mode(value, key: str = "train.activation_checkpointing") -> str:
    """train.activation_checkpointing (a TOML value, a command-line string, or what Python code set)
    as "none", "full", "selective" or "N", every N-th block full (N >= 2), or ConfigError naming key.

    The key was a bool: true and false, and the strings a bool took ("yes", "0", ...), keep their
    meaning. A number N of blocks agrees with them: 1 (every block) is "full", 0 (none) "none"."""
    text = value.strip().lower() if isinstance(value, str) else None
    if isinstance(value, bool) or text in ("true", "yes", "false", "no"):
        return "full" if value is True or text in ("true", "yes") else "none"
    if text in CHECKPOINTING_MODES:
        return text
    n = value if isinstance(value, int) else int(text) if text and text.isascii() and text.isdigit() else None
    if n is None or n < 0:
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, CHECKPOINTING_MODES))}, true, false "
                          f"or a number N >= 0 of blocks (every N-th block recomputed), got {value!r}")
    return "none" if n == 0 else "full" if n == 1 else str(n)


COMPILE_MODES = ("none", "model", "blocks")


def compile_mode(value, key: str = "train.compile") -> str:
    """train.compile (a TOML value, a command-line string, or what Python code set) as "none", "model"
    or "blocks", or ConfigError naming key.

    The key was a bool: true and false, and the strings a bool took ("yes", "0", ...), keep a meaning:
    true compiles, per block; false does not."""
    text = value.strip().lower() if isinstance(value, str) else None
    if isinstance(value, bool) or text in ("true", "yes", "1", "false", "no", "0"):
        return "blocks" if value is True or text in ("true", "yes", "1") else "none"
    if text not in COMPILE_MODES:
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, COMPILE_MODES))}, true or false, "
                          f"got {value!r}")
    return text


# Keys whose values _convert's type check alone does not take: normalised, or refused naming the key.
NORMALIZE = {("train", "activation_checkpointing"): checkpointing_mode, ("train", "compile"): compile_mode}


def _set(cfg: Config, section: str, key: str, value, origin: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown config section {section!r} (sections: {', '.join(SECTIONS)})")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise ConfigError(f"{origin}: unknown config key '{section}.{key}' (keys in [{section}]: "
                          f"{', '.join(hints)})")
    normalize = NORMALIZE.get((section, key))
    name = f"{origin}: {section}.{key}"
    setattr(obj, key, normalize(value, name) if normalize else _convert(value, hints[key], name))


def _apply_table(cfg: Config, table: dict, origin: str) -> None:
    for section, body in table.items():
        if section == "name":
            cfg.name = _convert(body, str, f"{origin}: name")
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: unknown top-level key {section!r} (expected name or a [section] "
                              f"table: {', '.join(SECTIONS)})")
        for key, value in body.items():
            _set(cfg, section, key, value, origin)


def parse_overrides(argv: list[str]) -> list[tuple[str, str, str]]:
    """``["--optim.lr", "3e-4", "--train.steps=10"]`` -> [("optim", "lr", "3e-4"), ("train", "steps", "10")].

    ``--resume X`` is accepted as ``--checkpoint.resume X``."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):  # no value starts with "--"; -1 is a value
                raise ConfigError(f"{arg}: missing a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if name == "resume":
            name = "checkpoint.resume"
        section, dot, key = name.partition(".")
        if name == "name":
            out.append(("", "name", value))
            continue
        if not dot or not key:
            raise ConfigError(f"{arg}: expected --section.key (sections: {', '.join(SECTIONS)})")
        out.append((section, key, value))
    return out


def load_config(source: str | None = None, overrides: list[str] | None = None) -> Config:
    """The config from a preset name or TOML path (default: the ``tiny`` preset) plus overrides. With
    model.init_from, the model's shape is that checkpoint's config.json's (fmcore.train.init_from.configure)."""
    cfg = Config()
    source = source or "tiny"
    path = Path(source)
    if source.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {source} not found")
        text, origin, cfg.name = path.read_text(), str(path), path.stem
    elif source in presets():
        text = (resources.files("fmcore.train") / "presets" / f"{source}.toml").read_text()
        origin, cfg.name = f"preset {source}", source
    else:
        raise ConfigError(f"{source!r} is neither a TOML file nor a preset ({', '.join(presets())})")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{origin}: {e}") from None
    _apply_table(cfg, table, origin)
    explicit = set()  # (a preset's values are not the user's)
    if origin == str(path):
        explicit = {f"{section}.{key}" for section, body in table.items() if isinstance(body, dict) for key in body}
    for section, key, value in parse_overrides(overrides or []):
        if not section:
            cfg.name = value
        else:
            _set(cfg, section, key, value, "command line")
            explicit.add(f"{section}.{key}")
    cfg.explicit = frozenset(explicit)
    if cfg.model.init_from:  # (before validate: train.seq_len is checked against the checkpoint's max_seq_len)
        from fmcore.train.init_from import configure

        cfg = configure(cfg)
    validate(cfg)
    return cfg


def parse_mix(text: str, key: str = "data.mix") -> list[tuple[str, float]]:
    """[(directory, weight)] from "DIR=WEIGHT,DIR=WEIGHT" (the weight after a directory's last "="); ConfigError
    naming key for an empty entry, a missing or non-numeric weight, one not finite and >= 0, or all of them 0."""
    pairs = []
    for entry in text.split(","):
        path, eq, weight = entry.strip().rpartition("=")
        if not eq or not path.strip():
            raise ConfigError(f"{key}: expected DIR=WEIGHT entries separated by commas, got {entry.strip()!r} "
                              f"in {text!r}")
        try:
            value = float(weight)
        except ValueError:
            raise ConfigError(f"{key}: the weight of {path.strip()!r} must be a number, got {weight!r}") from None
        if not (0 <= value < math.inf):
            raise ConfigError(f"{key}: the weight of {path.strip()!r} must be finite and >= 0, got {weight!r}")
        pairs.append((path.strip(), value))
    if not any(value > 0 for _, value in pairs):
        raise ConfigError(f"{key}: every weight is 0 in {text!r}: one must be > 0")
    return pairs


def parse_profile(text: str, steps: int, key: str = "log.profile") -> range | None:
    """log.profile "START:END" as the range of train steps it profiles, None when empty; ConfigError naming
    key for other syntax or a window not inside steps 1 to steps (END at most steps + 1)."""
    if not text.strip():
        return None
    start, colon, end = text.partition(":")
    try:
        if not colon:
            raise ValueError
        window = range(int(start), int(end))
    except ValueError:
        raise ConfigError(f"{key}: expected START:END, train steps START to END - 1 (\"10:13\": steps 10, 11 "
                          f"and 12), got {text!r}") from None
    if not 1 <= window.start < window.stop <= steps + 1:
        raise ConfigError(f"{key}: expected START:END with 1 <= START < END <= train.steps + 1 = {steps + 1} "
                          f"(steps START to END - 1 of the run's {steps}), got {text!r}")
    return window


def validate(cfg: Config) -> None:
    """Cross-field checks that need no data or device."""
    if cfg.data.mix:
        if cfg.data.dataset:
            raise ConfigError(f"data.mix and data.dataset are both set ({cfg.data.mix!r}, {cfg.data.dataset!r}): "
                              "give one (list the dataset in the mix with its weight)")
        parse_mix(cfg.data.mix)
    if not cfg.log.run_dir and (not cfg.name or cfg.name in (".", "..") or "/" in cfg.name):
        # The default run dir is runs/<name>: "" wrote the run into runs/ itself, "../x" or "/x" outside it.
        raise ConfigError(f"name: the default run dir is runs/<name>, so the name must be one directory name, "
                          f"got {cfg.name!r}; set log.run_dir to put the run elsewhere")
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    m, t = cfg.model, cfg.train
    checkpointing_mode(t.activation_checkpointing)  # set from Python (True, 2, "sometimes"): taken or refused
    compile_mode(t.compile)
    positive = {"model.dim": m.dim, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
                "model.max_seq_len": m.max_seq_len, "train.steps": t.steps, "train.batch_size": t.batch_size,
                "train.seq_len": t.seq_len, "train.eval_batches": t.eval_batches, "train.max_skipped": t.max_skipped,
                "log.every": cfg.log.every, "parallel.tensor": cfg.parallel.tensor,
                "parallel.replicate": cfg.parallel.replicate}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected > 0, got {value}")
    ck, log = cfg.checkpoint, cfg.log
    non_negative = {"model.vocab_size": m.vocab_size, "model.n_kv_heads": m.n_kv_heads, "model.ffn_dim": m.ffn_dim,
                    "data.threads": cfg.data.threads, "schedule.warmup_steps": cfg.schedule.warmup_steps,
                    "train.tokens_per_step": t.tokens_per_step, "train.seed": t.seed, "train.eval_every": t.eval_every,
                    "train.threads": t.threads, "checkpoint.every": ck.every, "checkpoint.keep_last": ck.keep_last,
                    "checkpoint.keep_every": ck.keep_every, "log.sample_tokens": log.sample_tokens,
                    # floats: finite too (NaN fails every comparison; an infinite eps or std trains nothing)
                    "model.norm_eps": m.norm_eps, "model.init_std": m.init_std, "optim.eps": cfg.optim.eps,
                    "optim.weight_decay": cfg.optim.weight_decay, "optim.grad_clip": cfg.optim.grad_clip,
                    "log.peak_tflops": log.peak_tflops}
    for key, value in non_negative.items():
        if not (0 <= value < math.inf):
            raise ConfigError(f"{key}: expected a finite value >= 0, got {value}")
    # Upper ends of what the machinery takes: torch.manual_seed's 64 bits; thread counts (100000
    # loader threads ran out of resources, torch.set_num_threads(100000) crashed).
    upper = {"train.seed": (t.seed, 2**64 - 1), "data.threads": (cfg.data.threads, 1024),
             "train.threads": (t.threads, 1024)}
    for key, (value, most) in upper.items():
        if value > most:
            raise ConfigError(f"{key}: expected at most {most}, got {value}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg.optim, key) < 1:
            raise ConfigError(f"optim.{key}: expected a value in [0, 1), got {getattr(cfg.optim, key)}")
    if cfg.parallel.replicate > 1 and cfg.parallel.data != "fsdp2":
        # (the replicas of ddp and zero1 are every rank already; their state is not sharded)
        raise ConfigError(f"parallel.replicate {cfg.parallel.replicate} (hybrid sharding) needs parallel.data "
                          f"'fsdp2', got {cfg.parallel.data!r}")
    if not 0 < cfg.parallel.timeout_s < math.inf:
        raise ConfigError(f"parallel.timeout_s: expected a finite value > 0, got {cfg.parallel.timeout_s}")
    if not 0 < m.rope_base < math.inf:
        raise ConfigError(f"model.rope_base: expected a finite value > 0, got {m.rope_base}")
    for key in ("rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
        if not 0 < getattr(m, key) < math.inf:
            raise ConfigError(f"model.{key}: expected a finite value > 0, got {getattr(m, key)}")
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        # (the blend between them divides by their difference)
        raise ConfigError(f"model.rope_high_freq_factor ({m.rope_high_freq_factor}) must exceed "
                          f"model.rope_low_freq_factor ({m.rope_low_freq_factor})")
    if m.head_dim < 0:
        raise ConfigError(f"model.head_dim: expected a value >= 0 (0: dim / n_heads), got {m.head_dim}")
    if m.sliding_window < 0:
        raise ConfigError(f"model.sliding_window: expected a value >= 0 (0: no window), got {m.sliding_window}")
    if m.arch == "gpt2":  # (gpt2's attention has model.bias, and its head dim is dim / n_heads)
        llama_only = [f"model.{k} = {getattr(m, k)!r}" for k in ("qkv_bias", "qk_norm", "sliding_window")
                      if getattr(m, k)]
        llama_only += [f"model.head_dim = {m.head_dim}"] if m.head_dim not in (0, m.dim // m.n_heads) else []
        if llama_only:
            raise ConfigError(f"{', '.join(llama_only)}: a llama feature; gpt2 needs qkv_bias and qk_norm false, "
                              "sliding_window 0, head_dim 0 (dim / n_heads)")
    if m.dim % m.n_heads and not m.head_dim:
        raise ConfigError(f"model.dim ({m.dim}) must be a multiple of model.n_heads ({m.n_heads}) "
                          "unless model.head_dim is set")
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        raise ConfigError(f"model.n_kv_heads ({kv}) must divide model.n_heads ({m.n_heads})")
    if m.arch == "gpt2" and kv != m.n_heads:
        raise ConfigError("model.n_kv_heads: grouped-query attention is a llama feature; gpt2 needs n_kv_heads = 0")
    if m.arch == "llama" and (m.head_dim or m.dim // m.n_heads) % 2:
        raise ConfigError(f"model: llama's RoPE needs an even head dim, got {m.head_dim or m.dim // m.n_heads}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if not 0 <= cfg.schedule.min_lr_ratio <= 1:
        raise ConfigError(f"schedule.min_lr_ratio: expected a value in [0, 1], got {cfg.schedule.min_lr_ratio}")
    if not 0 < cfg.schedule.decay_fraction <= 1:
        raise ConfigError(f"schedule.decay_fraction: expected a value in (0, 1], got {cfg.schedule.decay_fraction}")
    if not math.isfinite(cfg.optim.lr) or cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: expected a finite value > 0, got {cfg.optim.lr}")
    parse_profile(cfg.log.profile, t.steps)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that load_config reads back to an equal Config."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):  # a TOML basic string: \\, " and the control characters TOML forbids raw escaped
            v = v.replace("\\", "\\\\").replace('"', '\\"')
            return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in v) + '"'
        return repr(v)

    lines = [f"name = {fmt(cfg.name)}"]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            lines.append(f"{key} = {fmt(value)}")
    return "\n".join(lines) + "\n"


def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal under each field of a config dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def help_text() -> str:
    """Every section and key with its type, default and docstring (what `fmcore train --help` prints)."""
    # The top-level key first: an override (--name) like the sections' keys, and one --help should list.
    # (Its default is the source's: load_config names the run after the preset or the TOML file.)
    lines = ["[top level]", "  --name (str, default the preset's name, or the TOML file's name = or stem)",
             f"      {field_docs(Config)['name']}"]
    for section in SECTIONS:
        cls = type(getattr(Config(), section))
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            lines.append(f"  --{section}.{f.name} ({hints[f.name].__name__}, default {f.default!r})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)
