"""The run directory and resuming: which dir a run writes to and which checkpoint it continues from,
the lock that keeps two runs out of one dir, and the checks that a checkpoint fits the run resuming it
(model, parallel layout, precision; not the world size, which may change), each raising a ConfigError
that names what differs before torch.distributed.checkpoint would fail on a key or load the wrong
weights silently."""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import os
import time
from pathlib import Path

from fmcore.train import checkpoint, metrics, models
from fmcore.train.config import Config, ConfigError


def choose_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume or None). The default run dir is runs/<name>; a fresh run whose
    default dir already holds a run takes runs/<name>-2, -3, ... A fresh run in an explicit
    log.run_dir that already holds checkpoints is an error (pass --resume auto to continue it). A
    checkpoint dir to resume continues in log.run_dir when one is given (a branch of that run: the
    original's checkpoints stay untouched), else in the run dir holding the checkpoint (or, for one
    in no run dir, in the default run dir of a fresh run)."""
    resume = cfg.checkpoint.resume
    if cfg.log.run_dir:
        candidates = [Path(cfg.log.run_dir)]
    else:
        base = Path("runs") / cfg.name
        others = sorted(base.parent.glob(f"{base.name}-*")) if base.parent.is_dir() else []
        candidates = [base] + [p for p in others if p.name[len(base.name) + 1:].isdigit()]
    if resume not in ("none", "auto"):
        path = Path(resume)
        if not (path / ".metadata").is_file():
            raise ConfigError(f"checkpoint.resume: {path} is not a checkpoint directory (one holds the "
                              f".metadata file torch.distributed.checkpoint writes)")
        own_run = path.resolve().parent.parent
        if not cfg.log.run_dir:
            # (A run writes both before its first step: every run dir holding checkpoints has them.)
            if (own_run / "config.toml").is_file() or (own_run / "metrics.jsonl").is_file():
                return own_run, path
            # A checkpoint outside a run dir (copied or downloaded on its own, ~/Downloads/step_00000100):
            # its grandparent became the run dir, config.toml, metrics.jsonl, checkpoints/, hf/ and a .lock
            # written into a folder of the user's. It continues in the default run dir, as a fresh run would.
            return _new_default_run_dir(cfg), path
        run = candidates[0]
        if run.resolve() != own_run and checkpoint.step_dirs(run / "checkpoints"):
            raise ConfigError(f"log.run_dir {run} already holds checkpoints of another run; resume {path} into a "
                              "new --log.run_dir, or leave log.run_dir unset to continue in its own run dir")
        return run, path
    if resume == "auto":
        found = [(ck.stat().st_mtime, run, ck) for run in candidates if (ck := checkpoint.latest(run / "checkpoints"))]
        if found:
            _, run, ck = max(found)
            return run, ck
        return candidates[0], None
    if cfg.log.run_dir:
        run = candidates[0]
        if checkpoint.step_dirs(run / "checkpoints"):
            raise ConfigError(f"log.run_dir {run} already holds checkpoints: pass --resume auto to continue that "
                              "run, or choose another --log.run_dir")
        return run, None
    return _new_default_run_dir(cfg), None


def _new_default_run_dir(cfg: Config) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... when it holds a run."""
    n = 1
    while True:
        run = Path("runs") / (cfg.name if n == 1 else f"{cfg.name}-{n}")
        # A dir holding only a free .lock was left by a run that failed before writing anything (a config
        # or data error found after it locked the dir): counted as a run, each retry moved to a new dir.
        if not run.exists() or {p.name for p in run.iterdir()} <= {".lock"} and not lock_held(run):
            return run
        n += 1


def lock_run_dir(run_dir: Path) -> int:
    """An exclusive lock on run_dir, held while the returned fd is open; the kernel drops it when the
    process ends, however it ends. Two runs in one run dir (a job started twice, two --resume auto)
    would interleave their metrics, set aside or prune each other's checkpoints and delete each
    other's saves in progress."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # (a file of that name, a read-only file system: a traceback of mkdir's before)
        raise ConfigError(f"log.run_dir {run_dir} cannot be the run dir: {e.strerror}: {e.filename}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"log.run_dir {run_dir} is in use by another fmcore train (pid {holder}): wait for it to "
                          "end, or choose another --log.run_dir") from None
    except OSError:  # a file system without flock (some NFS or Lustre mounts): run unguarded, as before
        pass
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_held(run_dir: Path) -> bool:
    """Whether a live run holds run_dir's lock (lock_run_dir)."""
    try:
        fd = os.open(run_dir / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the fd
        return False
    except BlockingIOError:
        return True
    except OSError:  # a file system without flock: lock_run_dir runs unguarded there
        return False
    finally:
        os.close(fd)


def evaluated_at(run_dir: Path, step: int) -> bool:
    """Whether the run's metrics hold an evaluation of step."""
    path = run_dir / "metrics.jsonl"
    return path.is_file() and any(r["step"] == step and "eval_loss" in r for r in metrics.read_metrics(path))


def set_aside_later_checkpoints(run_dir: Path, resume_from: Path, step: int) -> str | None:
    """Resuming an earlier checkpoint of this run starts a new branch from it: the run's checkpoints
    after that step belong to the abandoned one. Left in place, retention (which keeps the highest
    steps) would delete the new branch's checkpoints and --resume auto would go back to the old one,
    so they move to checkpoints-abandoned-<time>/ (nothing reads or prunes it). The metrics after the
    step are truncated the same way (metrics.Reporter). Returns a message saying so, or None."""
    ckpt_dir = run_dir / "checkpoints"
    # One of this run's checkpoints set aside before (checkpoints-abandoned-*/) starts a branch too: the
    # abandoned branch's later checkpoints stayed in checkpoints/ beside the new branch's, where the next
    # --resume auto went on from the highest step, the abandoned branch's.
    if Path(resume_from).resolve().parent.parent != run_dir.resolve():
        return None
    later = [path for s, path in checkpoint.step_dirs(ckpt_dir) if s > step]
    if not later:
        return None
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for n in itertools.count(1):  # (two set-asides within one second: the second one's name taken)
        aside = run_dir / f"checkpoints-abandoned-{stamp}{'' if n == 1 else f'-{n}'}"
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
    for path in later:
        path.rename(aside / path.name)
    return f"resuming step {step} of this run: its {len(later)} later checkpoint(s) moved to {aside}"


def check_same_model(saved: dict | None, mcfg, vocab_size: int | None, path: Path,
                     resolved: dict | None = None) -> None:
    """A checkpoint resumes only the model it was written for. torch.distributed.checkpoint loads what
    the current model asks for: a smaller model would take its share of a larger one's weights
    silently, a larger one fail on a missing key. Compared resolved, all but ops (the same weights
    either way), init_std and init_from (used before step 0 only: a moved checkpoint directory is the
    same model, which the shape fields it sets say); skipped for a checkpoint without its config.
    resolved: the model config as the checkpoint's run resolved it (its extra state's "resolved_model"),
    else the checkpoint's config is resolved here, with this run's dataset: a model.vocab_size of 0
    (the dataset's) then looked the same on another tokenizer's dataset, and the embedding's shape
    failed in torch.distributed.checkpoint ("Size mismatch ... model.wte.weight") naming neither."""
    fields = {f.name for f in dataclasses.fields(mcfg)}
    if resolved is not None:
        written = dataclasses.replace(mcfg, **{k: v for k, v in resolved.items() if k in fields - {"ops"}},
                                      ops=mcfg.ops)
    elif saved and "model" in saved:
        written = dataclasses.replace(mcfg, **{k: v for k, v in saved["model"].items() if k in fields})
        written = models.resolve(dataclasses.replace(written, ops=mcfg.ops), vocab_size)
    else:
        return
    differ = [f"model.{f} = {getattr(written, f)!r} there, {getattr(mcfg, f)!r} here"
              + (" (the checkpoint's model.vocab_size 0 took its dataset's vocabulary, rounded up to a multiple of "
                 "64: check data.dataset)"
                 if f == "vocab_size" and vocab_size and getattr(mcfg, f) == -(-vocab_size // 64) * 64
                 and (saved or {}).get("model", {}).get("vocab_size") == 0 else "")
              for f in sorted(fields - {"ops", "init_std", "init_from"}) if getattr(written, f) != getattr(mcfg, f)]
    if differ:
        raise ConfigError(f"checkpoint.resume: {path} was written for another model ({'; '.join(differ)}); resume it "
                          f"with the config it was written with (config.toml in its run dir), or start a new run")


def check_same_layout(path: Path, extra: dict, cfg: Config) -> None:
    """The parallel layouts whose checkpoints cannot load into each other. ZeroAdamW (zero1) saves its
    flat buckets ("optim.flat0.bucket0.exp_avg") where the other optimizers save one entry per
    parameter: checkpoint.load converts between them (fmcore.train.relayout) with the buckets' layout,
    which a zero1 checkpoint records since the twenty-eighth session, and between zero1 runs whose
    buckets differ (laid out by param group: the optim.decay_* settings); an older one failed in DCP
    as one that "does not fit this model and optimizer: Missing key ...", naming neither the setting
    nor the model it does fit. The other
    layouts (none, ddp, fsdp2, each with or without tensor parallelism) reshard, tensor parallelism's
    split projections regrouped."""
    saved = extra.get("config") or {}
    there = saved.get("parallel")
    if not there:
        return
    differ = []
    if there.get("data") == "zero1" and "zero1_buckets" not in extra:
        if cfg.parallel.data != "zero1":
            differ.append(f"parallel.data = 'zero1' there, {cfg.parallel.data!r} here (this checkpoint does not "
                          "record its zero1 buckets' layout, which another optimizer's state is cut from)")
        for key in ("decay_embeddings", "decay_norms_biases"):
            written = (saved.get("optim") or {}).get(key, getattr(cfg.optim, key))
            if cfg.parallel.data == "zero1" and written != getattr(cfg.optim, key):
                differ.append(f"optim.{key} = {written!r} there, {getattr(cfg.optim, key)!r} here (zero1's flat "
                              "shards are laid out by param group, and this checkpoint does not record their layout)")
    if differ:
        raise ConfigError(f"checkpoint.resume: {path} was written in another parallel layout ({'; '.join(differ)}); "
                          "resume it with the settings it was written with (config.toml in its run dir)")


def check_same_precision(path: Path, saved: dict | None, cfg: Config, precision: str) -> None:
    """FusedAdamW keeps a bf16 run's fp32 master weights in its state: a bf16 checkpoint resumed in
    another precision would load its bf16-rounded weights and drop the fp32 copies silently, and
    another precision's checkpoint does not load into bf16 (its optimizer state lacks them). ZeroAdamW
    keeps fp32 masters in every precision."""
    if "zero1" in (cfg.parallel.data, ((saved or {}).get("parallel") or {}).get("data")):
        return
    bf16_there = checkpoint.has_master_weights(path)
    if bf16_there != (precision == "bf16"):
        there = ("train.precision 'bf16' (bf16 weights, fp32 master copies in the optimizer)" if bf16_there else
                 "a train.precision other than 'bf16' (no fp32 master copies in the optimizer)")
        raise ConfigError(f"checkpoint.resume: {path} was written with {there} and this run's is "
                          f"{precision!r}; resume it with the precision it was written with (config.toml in its run "
                          "dir), or start a new run")
