"""``fmcore export RUN_DIR [--step N] [--out DIR]``: a checkpoint of an fmcore run as a Hugging Face directory
(model.safetensors, config.json and the dataset's tokenizer.json), what the end of a run writes to RUN_DIR/hf
with checkpoint.export_hf: for an intermediate checkpoint, a run that crashed, or one trained without it.

The checkpoint may be of any parallel layout (none, ddp, fsdp2, zero1, tensor parallelism) and world size:
this one process reads it on the CPU with checkpoint.load, which reshards and regroups it as a resume on
one process would (relayout.py). The model and its optimizer state are held in CPU memory for that, about
16 bytes a parameter (20 with a bf16 run's master weights).

What is written: the weights as training holds them, in float32. For a train.precision "bf16" run that is
the optimizer's fp32 master copy (the bf16 parameters are it rounded; the end-of-run export writes those),
and config.json's torch_dtype says float32 either way. The model is the one the checkpoint recorded (its
resolved model config, the vocabulary included), so the dataset need not exist; the tokenizer file and the
EOS/BOS ids come from the dataset when its directory is still where the run read it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from fmcore.train import checkpoint
from fmcore.train.config import Config, ConfigError, ModelConfig, load_config


class ExportError(ValueError):
    """A run dir, checkpoint or output dir that `fmcore export` cannot use (the message names it)."""


def choose_checkpoint(run_dir: Path, step: int | None = None) -> tuple[int, Path]:
    """(step, checkpoint dir) of run_dir: step's, or the newest complete one (the one --resume auto takes).
    A save that did not finish (.tmp-step_*) is never one: checkpoint.step_dirs lists complete ones only."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"RUN_DIR {run_dir} is not a directory (expected a run dir written by `fmcore train`)")
    if not (run_dir / "config.toml").is_file():
        raise ExportError(f"RUN_DIR {run_dir} is not an fmcore run dir: it holds no config.toml (`fmcore train` "
                          "writes one into each run dir, with checkpoints/ beside it)")
    ckpt_dir = run_dir / "checkpoints"
    found = checkpoint.step_dirs(ckpt_dir)
    if not found:
        unfinished = sorted(p.name for p in ckpt_dir.glob(".tmp-*")) if ckpt_dir.is_dir() else []
        raise ExportError(f"{ckpt_dir} holds no complete checkpoint"
                          + (f" ({', '.join(unfinished)}: a save that did not finish)" if unfinished else "")
                          + ": a run saves one every checkpoint.every steps and at its end")
    if step is None:
        return found[-1]
    for s, path in found:
        if s == step:
            return s, path
    raise ExportError(f"--step {step}: {ckpt_dir} holds no checkpoint of that step; its steps are "
                      f"{', '.join(str(s) for s, _ in found)}")


def model_config(ckpt: Path, extra: dict, cfg: Config) -> ModelConfig:
    """The model checkpoint ckpt holds: the resolved config its run recorded in it, or, in a checkpoint
    from before that was recorded, the run's config.toml with the vocabulary of the saved embedding
    (the dataset's, which model.vocab_size 0 takes, may be gone)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    resolved = extra.get("resolved_model")
    if resolved is not None:
        mcfg = ModelConfig(**{k: v for k, v in resolved.items() if k in fields})
    else:
        from fmcore.train import models

        saved = checkpoint._saved(ckpt)
        rows = [saved[key].size[0] for key in ("model.wte.weight", "model.tok_embeddings.weight") if key in saved]
        if not rows:
            raise ExportError(f"{ckpt} holds no embedding (model.wte.weight or model.tok_embeddings.weight): "
                              "not a checkpoint of an fmcore model")
        mcfg = models.resolve(dataclasses.replace(cfg.model, init_from=""), rows[0])
    # (ops: the same weights either way; plain PyTorch's build everywhere. init_from: a fresh run's start only.)
    return dataclasses.replace(mcfg, ops="torch", init_from="")


def load_weights(ckpt: Path, cfg: Config, mcfg: ModelConfig) -> tuple[torch.nn.Module, bool]:
    """(model of checkpoint ckpt on the CPU in float32, whether its weights are a bf16 run's fp32 masters).
    Built as one process of the run would be (its precision: bf16 parameters with FusedAdamW's masters, else
    fp32), so that checkpoint.load restores it from any layout and world size, optimizer state included."""
    from fmcore.train import trainer

    saved = checkpoint._saved(ckpt)
    # (the weights' dtype, not checkpoint.has_master_weights: ZeroAdamW keeps fp32 masters in every precision)
    bf16 = any(isinstance(meta, TensorStorageMetadata) and meta.properties.dtype == torch.bfloat16
               for key, meta in saved.items() if key.startswith("model."))
    precision = "bf16" if bf16 else "fp32"
    cpu = torch.device("cpu")
    single = dataclasses.replace(cfg.parallel, data="none", tensor=1, replicate=1)
    one = dataclasses.replace(cfg, model=mcfg, parallel=single)
    model, _ = trainer.build_model(one, mcfg.vocab_size, trainer.Env(0, 1, 0, cpu), precision, fresh=False)
    optimizer = trainer.build_optimizer(model, one, "fmcore" if bf16 else "torch", precision, cpu)
    checkpoint.load(ckpt, model, optimizer)
    if bf16:
        for p in model.parameters():
            p.data = optimizer.state[p]["master_param"]
    return model, bf16


def run_tokenizer(run_dir: Path, vocab_size: int) -> tuple[Path | None, int | None, int | None, str]:
    """(tokenizer file, EOS id, BOS id, why no tokenizer file ("" when there is one)) of the run's dataset,
    the one its resolved.json names (a blend's first source: they share one tokenizer)."""
    from fmcore.data import Loader
    from fmcore.data.shards import ShardError
    from fmcore.train.plan import run_resolution
    from fmcore.train.trainer import dataset_tokenizer as tokenizer_file

    dataset = (run_resolution(run_dir) or {}).get("dataset")
    if not dataset:
        return None, None, None, f"{run_dir} has no resolved.json naming the run's dataset"
    first = Path(dataset if isinstance(dataset, str) else dataset[0][0])
    try:
        tok = Loader.manifest(first).get("tokenizer") or {}
    except ShardError as e:
        return None, None, None, f"the run's dataset is not readable ({e})"
    if (tok.get("vocab_size") or 0) > vocab_size:
        return None, None, None, (f"{first} is not the run's dataset now: its tokenizer has {tok['vocab_size']} "
                                  f"tokens, the model {vocab_size}")
    try:
        path = tokenizer_file(first)
    except ShardError as e:  # (a tokenizer.json replaced since: the model's ids are not its)
        return None, None, None, str(e)
    why = "" if path is not None and path.is_file() else f"the run's dataset {first} has no tokenizer file"
    return (path if not why else None), tok.get("eos_id"), tok.get("bos_id"), why


def export_checkpoint(run_dir: Path, step: int | None = None, out: Path | None = None,
                      overwrite: bool = False) -> dict:
    """Write the Hugging Face directory of run_dir's checkpoint of step (default: the newest) to out
    (default: run_dir/hf-step<N>). Returns what was done: step, checkpoint, out, masters, tokenizer_note."""
    from fmcore.train.export import export_hf

    run_dir = Path(run_dir)
    step, ckpt = choose_checkpoint(run_dir, step)
    out = Path(out) if out is not None else run_dir / f"hf-step{step}"
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} is not empty: pass --overwrite to replace the export's files in it, or "
                          "choose another --out")
    try:  # before the checkpoint is read: under a file or on a read-only path it was a traceback after that
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out} cannot be made: {e.strerror}: {e.filename}") from None
    extra = checkpoint.read_extra(ckpt)  # (checks that it is complete: .metadata and extra_rank0.pt)
    # (model.init_from cleared: the weights it names are the run's start, and may be gone by now)
    cfg = load_config(str(run_dir / "config.toml"), ["--model.init_from="])
    mcfg = model_config(ckpt, extra, cfg)
    with torch.no_grad():
        model, masters = load_weights(ckpt, cfg, mcfg)
        tokenizer, eos_id, bos_id, why = run_tokenizer(run_dir, mcfg.vocab_size)
        export_hf(model, mcfg, out, tokenizer=tokenizer, eos_id=eos_id, bos_id=bos_id)
    if tokenizer is None:
        (out / "tokenizer.json").unlink(missing_ok=True)  # an earlier export's (--overwrite): not this model's
    return {"step": step, "checkpoint": ckpt, "out": out, "masters": masters, "tokenizer_note": why}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fmcore export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a run dir written by `fmcore train` (config.toml, checkpoints/step_*)")
    parser.add_argument("--step", type=int, default=None,
                        help="export the checkpoint of this step (default: the newest complete one, the one "
                             "--resume auto continues)")
    parser.add_argument("--out", type=Path, default=None, help="the output directory (default: RUN_DIR/hf-step<N>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out that is not empty (its model.safetensors, config.json and "
                             "tokenizer.json are replaced; other files stay)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        done = export_checkpoint(args.run_dir, args.step, args.out, args.overwrite)
    except (ExportError, ConfigError, checkpoint.CheckpointError) as e:
        print(f"fmcore export: error: {e}", file=sys.stderr)
        return 2
    weights = "the fp32 master weights of a train.precision bf16 run" if done["masters"] else "fp32 weights"
    print(f"fmcore export: {done['checkpoint']} -> {done['out']} ({weights})")
    if done["tokenizer_note"]:
        print(f"fmcore export: note: no tokenizer.json written: {done['tokenizer_note']}", file=sys.stderr)
    return 0
