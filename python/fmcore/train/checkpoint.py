"""Checkpoints with torch.distributed.checkpoint (DCP): sharded-ready, atomic, pruned.

Layout: <run_dir>/checkpoints/step_00000100/ holds DCP's files for {"model", "optim"} (the state dicts
from torch.distributed.checkpoint.state_dict, so the same code saves a plain, DDP or FSDP2 model) and
extra_rank<r>.pt per process: step, loader position, every RNG state, loss-scaler state, counters
(read_extra: a run on more processes than wrote it gives the others rank 0's).

Atomicity: everything is written into .tmp-step_00000100/ (files fsynced), and rank 0 renames it to
step_00000100/ only when every rank is done. A directory named step_* is therefore always complete;
a crash leaves at most a .tmp-* directory (or a .del-* one, when pruning), which nothing reads and the
next save deletes. Saving a step that already has a checkpoint (a branch resumed from a checkpoint
set aside in checkpoints-abandoned-*/, say) moves the old one to .old-step_* first: a crash before the
new one takes its name leaves that complete old one as the step's only checkpoint, so it counts as the
step's checkpoint until a save renames it back.
DCP works in a single process without init_process_group (it then skips the collectives).

save_async (checkpoint.async_save) returns once the state is copied to CPU memory and writes, renames
and prunes in a background thread: the same files, the same rename once every rank's are written.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
import threading
import traceback
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from fmcore.train.parallel import load_model_optim_state_dict, model_optim_state_dict


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (incomplete, damaged, or of another model or optimizer), or
    one that could not be written (a full disk, a checkpoint dir that is not a directory)."""

PREFIX = "step_"
OLD = ".old-"  # a step's checkpoint set aside while a new one of the step is saved


def _barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group)


@contextlib.contextmanager
def _quiet():
    """DCP warns that it assumes a single process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Every RNG the loop can touch: Python, NumPy, torch CPU and (when present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ckpt_dir, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        name = p.name.removeprefix(OLD)
        if (p.is_dir() and name.startswith(PREFIX) and name[len(PREFIX):].isdigit()
                and (name == p.name or not (ckpt_dir / name).exists())):  # (see the module docstring)
            out.append((int(name[len(PREFIX):]), p))
    return sorted(out)


def latest(ckpt_dir: Path) -> Path | None:
    dirs = step_dirs(ckpt_dir)
    return dirs[-1][1] if dirs else None


def save(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict,
         keep_last: int = 0, keep_every: int = 0) -> Path:
    """Write the checkpoint of ``step`` (collective: every rank calls it) and prune old ones."""
    final, tmp = _begin(ckpt_dir, step)
    error = None
    try:
        model_sd, optim_sd = model_optim_state_dict(model, optimizer)
        with _quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    except (CheckpointException, OSError, RuntimeError) as e:
        error = e
    return _publish(ckpt_dir, step, final, tmp, extra, error, keep_last, keep_every)


def save_async(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict,
               keep_last: int = 0, keep_every: int = 0, group: dist.ProcessGroup | None = None) -> PendingSave:
    """save(), but returning once this rank's state is copied to CPU memory (DCP's async_save and its
    default stager): the writes, the rename to step_* and the pruning run in a background thread.

    Collective, like save(); `group` is background_group()'s (None without a process group). The
    previous save's must be over (PendingSave.wait): this one's setup deletes unfinished saves' dirs.
    `extra` is written in the background: it must not change afterwards. A single process warns from
    the background thread that DCP saves without a process group: silence it with _quiet() around the run."""
    final, tmp = _begin(ckpt_dir, step)
    # Owned and closed here (torch 2.11's async_save never closes the stager it makes itself): the staged
    # copy is freed when the write ends. Not pinned: pinning fresh memory at each save costs about what it saves.
    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=False,
                                          use_non_blocking_copy=False))
    try:
        model_sd, optim_sd = model_optim_state_dict(model, optimizer)
        upload = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, process_group=group,
                                async_stager=stager)
    except (OSError, RuntimeError) as e:  # staging on this rank alone (out of CPU memory): as in save()
        stager.close()
        raise _failed(ckpt_dir, step, tmp, _causes(e), e)
    except BaseException:
        stager.close()
        raise
    abandoned = threading.Event()

    def write_and_publish() -> Path:
        error = None
        try:
            upload.result()
        except (CheckpointException, Exception) as e:  # (CheckpointException is a BaseException)
            error = e
        finally:
            stager.close()
        return _publish(ckpt_dir, step, final, tmp, extra, error, keep_last, keep_every, group, abandoned)

    try:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fmcore-checkpoint-{step}")
        future = executor.submit(write_and_publish)
        executor.shutdown(wait=False)
        return PendingSave(step, final, future, abandoned)
    except BaseException:  # Ctrl-C before the caller holds the save: written, maybe, but never published
        abandoned.set()
        raise


class PendingSave:
    """A checkpoint that save_async is writing in the background; `path` exists once wait() returns."""

    def __init__(self, step: int, path: Path, future: Future, abandoned: threading.Event):
        self.step, self.path = step, path
        self._future, self._abandoned = future, abandoned

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> Path:
        """The checkpoint's path once written, renamed and pruned on every rank; raises the background
        write's CheckpointError (naming the step; the complete checkpoints are untouched)."""
        return self._future.result()

    def abandon(self) -> None:
        """Rank 0 will not publish the checkpoint (rename it to step_*) even if its write completes: it
        stays a .tmp-* dir, which the next save deletes. The write itself goes on (Python cannot stop a
        thread) and the interpreter waits for it at exit; wait() is then meaningless."""
        self._abandoned.set()


def background_group(timeout_s: float) -> dist.ProcessGroup | None:
    """A gloo group of every rank for save_async's collectives (None without a process group): DCP's
    async save needs a CPU backend (a CUDA run's default group is NCCL alone), and its collectives run
    in a background thread while training's run on the default group in the main thread, in an order
    that could differ between ranks on one group. Collective: every rank calls it."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def _begin(ckpt_dir: Path, step: int) -> tuple[Path, Path]:
    """The checkpoint's final and temporary dirs, the temporary one made (empty) by rank 0 for every
    rank to write into. Collective."""
    rank = _rank()
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{final.name}"
    error = None
    if rank == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            # The leftovers of crashes mid-save, this step's and any other's (a step this run will not
            # save again: checkpoint.every changed, or an earlier checkpoint resumed), and mid-prune,
            # each up to a checkpoint's size. No other run writes here: the trainer holds the run dir's lock.
            for leftover in [*ckpt_dir.glob(".tmp-*"), *ckpt_dir.glob(".del-*")]:
                shutil.rmtree(leftover, ignore_errors=True)
            for aside in ckpt_dir.glob(f"{OLD}*"):  # by a save that crashed before its final rename
                restored = ckpt_dir / aside.name.removeprefix(OLD)
                if restored.exists():
                    shutil.rmtree(aside, ignore_errors=True)
                else:
                    os.rename(aside, restored)
            tmp.mkdir()
        except OSError as e:
            error = e
    # Every rank learns of every rank's failure where only some ranks can fail (rank 0's setup, each
    # rank's extra file): a rank raising alone would leave the others in a barrier (until its process
    # exits, or the process group's timeout), and a caller that goes on after the error would match
    # that barrier with its next collective, letting rank 0 publish the partial save. DCP gathers its
    # writers' errors itself (every rank raises the same CheckpointException).
    failures = _failures(error)
    if failures:
        raise _failed(ckpt_dir, step, tmp, failures, error)
    return final, tmp


def _publish(ckpt_dir: Path, step: int, final: Path, tmp: Path, extra: dict, error: BaseException | None,
             keep_last: int, keep_every: int, group: dist.ProcessGroup | None = None,
             abandoned: threading.Event | None = None) -> Path:
    """After DCP's write into tmp (which raised `error`, or None): writes this rank's extra file, and
    rank 0 renames tmp to final once every rank's files are written, then prunes. Collective over group."""
    rank = _rank()
    if error is not None:
        # Raised on every rank by DCP, or on this rank alone before or outside DCP's collectives,
        # which the others are in: they fail when this process exits (or at the group's timeout).
        failures = _causes(error)
    else:
        try:
            extra_path = tmp / f"extra_rank{rank}.pt"
            with open(extra_path, "wb") as f:
                torch.save(extra, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            error = e
        failures = _failures(error, group)
    if failures:
        raise _failed(ckpt_dir, step, tmp, failures, error)
    # (_failures' gather above was the barrier: every rank's files are written.)
    if rank == 0 and not (abandoned is not None and abandoned.is_set()):
        _fsync_path(tmp)  # its entries (each writer fsynced its files: DCP's sync_files, the extra files above)
        old = None
        if final.exists():  # a step saved again (see the module docstring)
            old = ckpt_dir / f"{OLD}{final.name}"
            os.rename(final, old)  # (the leftover cleanup above left no .old-* behind)
        os.rename(tmp, final)
        _fsync_path(ckpt_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        prune(ckpt_dir, keep_last, keep_every)
    _barrier(group)
    return final


def _failed(ckpt_dir: Path, step: int, tmp: Path, failures: str, error: BaseException | None) -> BaseException:
    """What a failed save raises (rank 0 deleting its partial dir first): KeyboardInterrupt for Ctrl-C,
    else a CheckpointError naming the step, the causes and the free space."""
    # DCP raises its writers' errors as one CheckpointException holding a traceback per rank, and
    # torch's zip writer turns a full disk into "unexpected pos N vs M": name the step, the cause
    # and the free space instead, and delete the partial save (on a full disk, space it holds).
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if _interrupted(error, rank):
        # Ctrl-C (or torchrun passing on a SIGINT) while this rank was saving is no failed save: DCP
        # catches it with its writers' errors, and an interrupted torch.save becomes "unexpected pos".
        return KeyboardInterrupt()
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    failed = CheckpointError(f"saving the checkpoint of step {step} in {ckpt_dir} failed ({free}): {failures}; the "
                             f"complete checkpoints there are untouched (resume with --resume auto once it is fixed)")
    failed.__cause__ = error  # (fmcore train prints the message; a caller of save() keeps the traceback)
    return failed


def prune(ckpt_dir: Path, keep_last: int, keep_every: int) -> None:
    """Delete all but the newest keep_last (0: keep all) and those whose step is a multiple of keep_every."""
    if keep_last <= 0:
        return
    dirs = step_dirs(ckpt_dir)
    for step, path in dirs[:-keep_last]:
        if not (keep_every > 0 and step % keep_every == 0):
            # Renamed first: a crash inside rmtree would leave a step_* directory missing files.
            doomed = path.with_name(f".del-{path.name}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _saved(path: Path) -> dict:
    """The flattened keys of checkpoint dir path and their metadata (shapes, dtypes), from DCP's .metadata."""
    try:
        return dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # a truncated or overwritten pickle: EOFError, UnpicklingError; a missing file: OSError
        raise CheckpointError(f"{path} is damaged (.metadata is unreadable: {_causes(e)}); resume an earlier "
                              "checkpoint") from None


def has_master_weights(path: Path) -> bool:
    """Whether checkpoint dir path holds FusedAdamW's fp32 master weights (a train.precision bf16 run)."""
    keys = _saved(path)
    return any(key.startswith("optim.state.") and key.endswith(".master_param") for key in keys)


def read_extra(path: Path) -> dict:
    """This rank's extra dict of checkpoint dir path (step, loader and RNG state, the run's config).

    A checkpoint resumed on more processes than wrote it gives the ranks it has no file for rank 0's:
    its loader state is the next global sample (which the loader reshards to any world size), its
    counters are the run's, and the RNGs drive nothing in training once the model's initial weights
    (which the checkpoint replaces) are drawn."""
    path = Path(path)
    rank = _rank()
    if not (path / f"extra_rank{rank}.pt").exists() and rank >= len(list(path.glob("extra_rank*.pt"))):
        rank = 0
    extra_path = path / f"extra_rank{rank}.pt"
    if not (path / ".metadata").is_file() or not extra_path.is_file():
        raise CheckpointError(f"{path} is not a complete fmcore checkpoint (missing .metadata or {extra_path.name})")
    try:
        return torch.load(extra_path, weights_only=False)
    except Exception as e:  # torch's zip reader: RuntimeError; a truncated pickle: EOFError, UnpicklingError
        raise CheckpointError(f"{path} is damaged ({extra_path.name} is unreadable: {_causes(e)}); resume an earlier "
                              "checkpoint") from None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore model and optimizer in place from checkpoint dir path (read_extra(path) first: it
    checks that the checkpoint is complete, and returns the rest of its state)."""
    from fmcore.dist import ZeroAdamW
    from fmcore.train import relayout

    # (Which path, before this layout's state dicts are made: the relayout paths make whole ones instead.)
    saved = _saved(path)
    zero1_there = any(key.startswith("optim.flat") for key in saved)
    if isinstance(optimizer, ZeroAdamW) != zero1_there:
        relayout.load_across_zero1(path, model, optimizer, saved)
        return
    if zero1_there and (recorded := relayout.changed_zero1_layout(path, model, optimizer)) is not None:
        relayout.load_between_zero1(path, model, optimizer, saved, recorded)
        return
    split_here = relayout.is_split(name for name, _ in model.named_parameters())
    if split_here != relayout.is_split(k[len("model."):] for k in saved if k.startswith("model.")):
        relayout.load_regrouped(path, model, optimizer, saved)
        return
    model_sd, optim_sd = model_optim_state_dict(model, optimizer)
    own_groups = [dict(g) for g in optim_sd.get("param_groups", [])]  # (before DCP loads into them)
    dropped = _drop_group_entries_not_saved(optim_sd, saved)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=path)
    except CheckpointException as e:  # a BaseException, its message a traceback per rank
        raise _load_failure(path, e) from None
    for group, names, own in zip(state["optim"].get("param_groups", []), dropped, own_groups):
        # The current optimizer's values for what the checkpoint lacks, and for torch's implementation
        # flags, which are this machine's choice, not the run's: a checkpoint of a GPU run (fused=True)
        # resumed on the CPU, or one written with foreach=False, brought its own back.
        group.update({k: own[k] for k in (*names, *_IMPLEMENTATION_FLAGS) if k in own})
    if [g.get("params") for g in state["optim"].get("param_groups", [])] != [g.get("params") for g in own_groups]:
        # The checkpoint groups the parameters otherwise (another parallel layout: tensor parallelism
        # splits each group into its DTensor and its plain parameters, fsdp2 makes them all DTensors).
        # torch maps saved groups to ours by parameter name, and a group of ours whose parameters it
        # found in none, or in a group it had mapped to another, got no hyperparameters (FusedAdamW:
        # KeyError 'lr'). The state is per parameter name and loads either way; the groups stay ours.
        state["optim"]["param_groups"] = own_groups
    load_model_optim_state_dict(model, optimizer, state["model"], state["optim"])


def _failures(error: BaseException | None, group: dist.ProcessGroup | None = None) -> str:
    """The causes of every rank's error (each rank passes its own, or None), naming the ranks in a
    group; "" when no rank failed. Collective over group (default: the default group): every rank
    calls it, whether it failed or not."""
    mine = None if error is None else _causes(error)
    if not (dist.is_available() and dist.is_initialized()):
        return mine or ""
    everyone = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(everyone, mine, group=group)
    except RuntimeError as e:  # a rank that died breaks the group (gloo: at once; NCCL: at its timeout)
        return f"{mine + '; ' if mine else ''}another rank is unreachable ({_causes(e)})"
    ranks: dict[str, list[int]] = {}
    for r, cause in enumerate(everyone):
        if cause is not None:
            ranks.setdefault(cause, []).append(r)
    return "; ".join(f"{cause} (rank {', '.join(map(str, rs))})" for cause, rs in ranks.items())


def _interrupted(e: BaseException | None, rank: int) -> bool:
    """Whether e, this rank's error in a save or load, is a KeyboardInterrupt: raised as such, wrapped in
    DCP's CheckpointException (its gather catches BaseException), or turned into another error while it
    unwound (torch's zip writer, interrupted mid-file, raises RuntimeError "unexpected pos")."""
    if isinstance(e, CheckpointException):
        e = (e.failures.get(rank) or (None,))[0]
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _load_failure(path: Path, e: BaseException) -> BaseException:
    """What a failed read of checkpoint path raises: KeyboardInterrupt for Ctrl-C (not a checkpoint that
    "does not fit"), else a CheckpointError saying whether the checkpoint is damaged or of another model."""
    if _interrupted(e, _rank()):
        return KeyboardInterrupt()
    failures = [exc for exc, *_ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
    what = ("is damaged (a file of it is missing or unreadable; resume an earlier checkpoint)"
            if any(_damaged(exc) for exc in failures) else "does not fit this model and optimizer")
    return CheckpointError(f"{path} {what}: {_causes(e)}{''.join(f'; {short}' for short in _cut_short(path))}")


def _cut_short(path: Path) -> list[str]:
    """Each data file of checkpoint path that ends before the bytes its .metadata places in it: the reader's
    EOFError or "PytorchStreamReader failed" names no file."""
    try:
        storage = dcp.FileSystemReader(str(path)).read_metadata().storage_data
        ends = {}
        for info in storage.values():  # (torch's _StorageInfo: relative_path, offset, length)
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    except Exception:  # (.metadata unreadable itself, or a torch whose storage data reads otherwise: nothing to add)
        return []
    # (a missing one: its FileNotFoundError names it)
    sizes = {name: (path / name).stat().st_size for name in ends if (path / name).is_file()}
    return [f"{name} holds {sizes[name]} bytes, .metadata places data up to byte {end}"
            for name, end in sorted(ends.items()) if sizes.get(name, end) < end]


def _damaged(exc: BaseException) -> bool:
    """Whether a read failed on the checkpoint's bytes: a missing or unreadable file (OSError), or a
    truncated or overwritten .distcp (torch's zip reader's RuntimeError "PytorchStreamReader failed ...",
    or EOFError / UnpicklingError), which read as a checkpoint of another model ("does not fit")."""
    return (isinstance(exc, (OSError, EOFError, pickle.UnpicklingError))
            or isinstance(exc, RuntimeError) and "PytorchStreamReader failed" in str(exc))


def _causes(e: BaseException) -> str:
    """The one-line message of e, or of each rank's exception in a CheckpointException."""
    failures = [exc for exc, *_ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
    return "; ".join(sorted({"".join(traceback.format_exception_only(type(exc), exc)).strip() for exc in failures}))


_IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable")


def _drop_group_entries_not_saved(optim_sd: dict, saved: dict) -> list[list[str]]:
    """Removes from optim_sd's param groups the entries the checkpoint (its keys, `saved`) lacks;
    returns their names.

    FusedAdamW and torch.optim.AdamW save the same state and hyperparameters, but torch's groups
    also hold its implementation flags (foreach, fused, capturable, ...). torch.distributed.checkpoint
    loads every key the current state asks for, so a checkpoint of one would not load into the other
    (optim.impl changed, or "auto" deciding otherwise on another machine); those flags keep the
    current optimizer's values instead."""
    prefix = "optim.param_groups."
    entries = {tuple(key[len(prefix):].split(".")[:2])  # (group index, entry), as flattened keys name them
               for key in saved if key.startswith(prefix)}
    dropped = []
    for i, group in enumerate(optim_sd.get("param_groups", [])):
        missing = [k for k in group if (str(i), k) not in entries]
        for k in missing:
            del group[k]
        dropped.append(missing)
    return dropped
