"""checkpoint.load of a checkpoint written in a layout whose state dict names other tensors.

torch.distributed.checkpoint (DCP) reshards a tensor between layouts and world sizes, not one tensor
into several. Two layouts name other tensors than the rest:
- tensor parallelism saves each fused projection (GPT-2's qkv, Llama's wqkv and w_gate_up) as
  SplitLinear's parts ("blocks.0.qkv.parts.1.weight"), so that each rank keeps whole heads;
- zero1 (ZeroAdamW) saves its optimizer state as flat buckets ("flat0.bucket1.exp_avg": the
  elements of some parameters back to back), the other optimizers one entry per parameter.
Between those and the others, rank 0 reads the checkpoint into whole tensors on its CPU (the full
state of this model and optimizer: once, at this resume; a 1.5B model with bf16 masters is ~24 GB),
cut or joined into this layout's names, and sends every rank its shards: torch's
set_model_state_dict / set_optimizer_state_dict with broadcast_from_rank0, or broadcasts of the
whole buckets that ZeroAdamW slices. So too between zero1 runs whose buckets hold other parameters
(other param groups, another bucket_mb): each saved bucket is cut into its parameters' rows, joined
into this optimizer's buckets. The param groups stay this optimizer's (the trainer sets the
hyperparameters from the config after loading anyway).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

from fmcore.train.checkpoint import CheckpointError, _load_failure, _quiet, _rank, read_extra
from fmcore.train.parallel import full_state_dicts, split_part, split_parts

ZERO1_STATE = (("master", "master_param"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"))  # zero1's, per param


def is_split(names) -> bool:
    """Whether a state dict's keys are tensor parallelism's (its SplitLinear parts)."""
    return any(split_part(name) is not None for name in names)


def zero1_layout(model: torch.nn.Module, optimizer) -> list[list[list[str]]]:
    """A ZeroAdamW's buckets as its parameters' names: per flat shard i, per bucket j, in order (the
    trainer records it in each zero1 checkpoint, for load_across_zero1)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[[names[id(p)] for p in bucket] for bucket in flat] for flat in optimizer.bucket_params()]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _on_rank_0(path: Path, read: Callable[[], None]) -> None:
    """Runs read() on rank 0; its failure is raised on every rank (the others would wait for rank 0 in
    the broadcasts that follow), as load() reports DCP's."""
    error = None
    if _rank() == 0:
        try:
            read()
        except BaseException as e:  # noqa: BLE001  (every rank raises it, below)
            error = _load_failure(path, e)
    if _distributed():
        message = [None if error is None else str(error) or "interrupted (KeyboardInterrupt)"]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            raise CheckpointError(f"{message[0]} (read on rank 0)")
    if error is not None:
        raise error


def _set_whole_model(model: torch.nn.Module, model_sd: dict) -> StateDictOptions:
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=_distributed())
    set_model_state_dict(model, model_sd, options=options)
    return options


def load_regrouped(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A tensor-parallel checkpoint into a model without tensor parallelism, or the reverse: each part's
    rows are read into the fused tensor's, or the fused tensor's rows into the parts'."""
    model_sd, optim_sd = full_state_dicts(model, optimizer)  # rank 0's; {} on the others

    def read():
        states = optim_sd["state"]
        model_t, model_settle = regroup(model_sd, saved, "model.{}")
        targets, settles = {"model": model_t, "optim": {"state": {}}}, []
        for field in sorted({field for state in states.values() for field in state}):
            here = {name: state[field] for name, state in states.items() if field in state}
            there, settle = regroup(here, saved, f"optim.state.{{}}.{field}")
            for name, target in there.items():
                targets["optim"]["state"].setdefault(name, {})[field] = target
            settles.append((field, there, settle))
        with _quiet():
            dcp.load(targets, checkpoint_id=path, no_dist=True)
        model_sd.update(model_settle(model_t))
        for field, there, settle in settles:
            # (DCP loaded into `targets`' nested dicts, the same tensors `there` holds)
            for name, value in settle(there).items():
                states[name][field] = value

    _on_rank_0(path, read)
    # (Two calls: set_state_dict takes an empty model state dict, as the other ranks hold, for "optimizer
    # only" and skips the model's broadcasts there, which rank 0 then waits in.)
    options = _set_whole_model(model, model_sd)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


def load_across_zero1(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A zero1 checkpoint into another layout's optimizer, or the reverse. The buckets' layout (which
    parameters, in which order) is the zero1 optimizer's: this one's, or the one its run recorded in
    the checkpoint (extra "zero1_buckets"). The model's tensors load as in any other layout (regrouped
    when tensor parallelism splits them on one side)."""
    from fmcore.dist import ZeroAdamW

    into_zero1 = isinstance(optimizer, ZeroAdamW)
    if into_zero1:
        layout = zero1_layout(model, optimizer)
        model_sd, optim_sd = full_state_dicts(model)
    else:
        layout = read_extra(path).get("zero1_buckets")
        if layout is None:
            raise CheckpointError(f"{path} was written by zero1 before checkpoints recorded its buckets' layout: "
                                  "resume it with parallel.data zero1")
        model_sd, optim_sd = full_state_dicts(model, optimizer)
    whole = {}  # zero1's state, unsharded: "flat{i}.bucket{j}.<state>", "flat{i}.step"

    def read():
        model_t, model_settle = regroup(model_sd, saved, "model.{}")
        targets = {"model": model_t, "optim": {}}
        if into_zero1:
            masters = _buckets_from_parameters(layout, model_sd, saved, targets["optim"], whole)
        else:
            _bucket_targets(layout, saved, targets["optim"], whole)
        with _quiet():
            dcp.load(targets, checkpoint_id=path, no_dist=True)
        model_sd.update(model_settle(model_t))
        if into_zero1:
            for name, master in masters.items():  # a checkpoint without fp32 masters: the weights are theirs
                master.copy_(model_sd[name].reshape(-1))
        else:
            _parameters_from_buckets(layout, model_sd, optim_sd["state"], whole)

    _on_rank_0(path, read)
    options = _set_whole_model(model, model_sd)
    if into_zero1:
        _load_whole_zero1(optimizer, whole)
    else:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


def changed_zero1_layout(path: Path, model: torch.nn.Module, optimizer) -> list | None:
    """The buckets' layout a zero1 checkpoint recorded, when this ZeroAdamW's differs from it (other
    param groups: the trainer's optim.decay_* settings; another bucket_mb); None when they match or
    the checkpoint predates the record (DCP then loads it as it is, or fails naming the bucket)."""
    recorded = read_extra(path).get("zero1_buckets")
    return None if recorded is None or recorded == zero1_layout(model, optimizer) else recorded


def load_between_zero1(path: Path, model: torch.nn.Module, optimizer, saved: dict, recorded: list) -> None:
    """A zero1 checkpoint into a ZeroAdamW whose buckets hold other parameters (changed_zero1_layout):
    rank 0 cuts the saved buckets into each parameter's rows and joins those into this one's."""
    layout = zero1_layout(model, optimizer)
    model_sd, _ = full_state_dicts(model)
    whole = {}  # this optimizer's buckets, each as the rows that make it (joined when broadcast)

    def read():
        model_t, model_settle = regroup(model_sd, saved, "model.{}")
        targets, there = {"model": model_t, "optim": {}}, {}
        _bucket_targets(recorded, saved, targets["optim"], there)
        with _quiet():
            dcp.load(targets, checkpoint_id=path, no_dist=True)
        model_sd.update(model_settle(model_t))
        rows = _cut_buckets(recorded, there, {name: t.numel() for name, t in model_sd.items()})
        for i, flat in enumerate(layout):
            whole[f"flat{i}.step"] = _rows_of(rows, flat[0][0])["step"]
            for j, bucket in enumerate(flat):
                for zero1_key, _ in ZERO1_STATE:
                    whole[f"flat{i}.bucket{j}.{zero1_key}"] = [_rows_of(rows, name)[zero1_key] for name in bucket]

    _on_rank_0(path, read)
    _set_whole_model(model, model_sd)
    _load_whole_zero1(optimizer, whole)


def _rows_of(rows: dict, name: str) -> dict:
    """A parameter's rows of the saved buckets (_cut_buckets)."""
    if name not in rows:
        raise ValueError(f"optim: {name} is in no zero1 bucket of the checkpoint (its recorded layout)")
    return rows[name]


def _load_whole_zero1(optimizer, whole: dict) -> None:
    """ZeroAdamW.load_whole_state_dict of rank 0's whole buckets (`whole`), broadcast one at a time."""
    shapes = {}  # the other ranks' copies, shaped by their own layout
    for i, flat in enumerate(optimizer.bucket_params()):
        shapes |= {f"flat{i}.step": ()} | {f"flat{i}.bucket{j}.{k}": (sum(p.numel() for p in bucket),)
                                           for j, bucket in enumerate(flat) for k, _ in ZERO1_STATE}
    optimizer.load_whole_state_dict(_Broadcasts(whole, shapes, optimizer.bucket_params()[0][0][0].device))


class _Broadcasts:
    """Rank 0's whole buckets as ZeroAdamW.load_whole_state_dict reads them (each once, in the same order
    on every rank): each is broadcast when read and dropped once its slice is copied. Broadcasting them
    all first held the unsharded optimizer state (3 x 4 bytes a parameter) on every rank's device at
    once, the memory zero1 shards it to save: a resume that ran out of it where the run fitted. A
    bucket given as a list of its parameters' rows is joined only then (so rank 0 holds the saved
    buckets and one joined copy, not two copies of the whole state)."""

    def __init__(self, whole: dict, shapes: dict, device: torch.device):
        self.whole, self.shapes, self.device = whole, shapes, device

    def __getitem__(self, key: str) -> torch.Tensor:
        if _rank() == 0:
            t = self.whole.pop(key)
            t = (torch.cat(t) if isinstance(t, list) else t).to(self.device)
        else:
            t = torch.empty(self.shapes[key], dtype=torch.float32, device=self.device)
        if _distributed():
            dist.broadcast(t, src=0)
        return t


def _bucket_targets(layout: list, saved: dict, targets: dict, whole: dict) -> None:
    """DCP targets for a zero1 checkpoint's buckets, whole, into `whole` (and `targets`)."""
    for i, flat in enumerate(layout):
        keys = [f"flat{i}.step"] + [f"flat{i}.bucket{j}.{k}" for j in range(len(flat)) for k, _ in ZERO1_STATE]
        for key in keys:
            if f"optim.{key}" not in saved:
                raise ValueError(f"optim.{key} is not in the checkpoint (its zero1 buckets differ from those recorded)")
            meta = saved[f"optim.{key}"]
            whole[key] = targets[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)


def _cut_buckets(layout: list, whole: dict, numels: dict) -> dict:
    """zero1's whole buckets cut into each parameter's rows (1-D views): name -> {zero1 key: rows, "step": the
    flat's step}. numels: each parameter's element count, by the name the layout gives it."""
    rows = {}
    for i, flat in enumerate(layout):
        for j, bucket in enumerate(flat):
            missing = [name for name in bucket if name not in numels]
            if missing:
                raise ValueError(f"optim.flat{i}.bucket{j} holds {', '.join(missing)}, which this model lacks")
            sizes = [numels[name] for name in bucket]
            held = whole[f"flat{i}.bucket{j}.exp_avg"].numel()
            if sum(sizes) != held:
                raise ValueError(f"optim.flat{i}.bucket{j} holds {held} elements, its recorded parameters {sum(sizes)}")
            for zero1_key, _ in ZERO1_STATE:
                for name, part in zip(bucket, whole[f"flat{i}.bucket{j}.{zero1_key}"].split(sizes)):
                    rows.setdefault(name, {})[zero1_key] = part
            for name in bucket:
                rows[name]["step"] = whole[f"flat{i}.step"]
    return rows


def _parameters_from_buckets(layout: list, model_sd: dict, states: dict, whole: dict) -> None:
    """Each parameter's optimizer state (the entries this optimizer keeps) cut from zero1's buckets
    (whose parameters are never split: zero1 does not combine with tensor parallelism, which splits
    the fused projections here into SplitLinear's parts, given their rows)."""
    parts = split_parts(model_sd)  # fused name -> this model's names of its parts, in order
    numels = {name: t.numel() for name, t in model_sd.items()}
    numels |= {fused: sum(numels[n] for n in mine) for fused, mine in parts.items()}
    for name, cut in _cut_buckets(layout, whole, numels).items():
        mine = parts.get(name, [name])  # this model's tensors of the bucket's parameter
        for zero1_key, key in ZERO1_STATE:
            for n, part in zip(mine, cut[zero1_key].split([numels[n] for n in mine])):
                if key in states[n]:  # (torch's AdamW and fp32 runs keep no master_param)
                    states[n][key] = part.view(model_sd[n].shape)
        for n in mine:
            states[n]["step"] = cut["step"].clone()  # (one each: see regroup)


def _buckets_from_parameters(layout: list, model_sd: dict, saved: dict, targets: dict, whole: dict) -> dict:
    """DCP targets for each parameter's optimizer state, read into rows of zero1's whole buckets (in
    `whole`); returns the master rows the checkpoint has no fp32 master for (filled from the weights).
    A parameter without state there (torch's AdamW and FusedAdamW make it at its first gradient: one
    unused so far) keeps zero moments, as zero1 gives a parameter whose gradient has not come yet."""
    state_targets, masters = targets.setdefault("state", {}), {}
    for i, flat in enumerate(layout):
        whole[f"flat{i}.step"] = torch.zeros(())
        stepped = dict.fromkeys(name for bucket in flat for name in bucket if _has_state(name, saved))
        for j, bucket in enumerate(flat):
            numel = sum(model_sd[name].numel() for name in bucket)
            for zero1_key, _ in ZERO1_STATE:
                whole[f"flat{i}.bucket{j}.{zero1_key}"] = torch.zeros(numel)
            start = 0
            for name in bucket:
                t = model_sd[name]
                for zero1_key, key in ZERO1_STATE:
                    rows = whole[f"flat{i}.bucket{j}.{zero1_key}"][start:start + t.numel()]
                    if name not in stepped:
                        if zero1_key == "master":
                            masters[name] = rows
                        continue
                    try:
                        there, _ = regroup({name: rows.view(t.shape)}, saved, f"optim.state.{{}}.{key}")
                    except ValueError:
                        if zero1_key != "master":
                            raise
                        masters[name] = rows  # no fp32 master there (an fp32 run, or torch's AdamW)
                        continue
                    for n, target in there.items():  # (loaded in place, into the rows)
                        state_targets.setdefault(n, {})[key] = target
                start += t.numel()
        if stepped:  # (the flat's one step: its parameters' are equal, but for those not stepped yet)
            there, _ = regroup({next(iter(stepped)): whole[f"flat{i}.step"]}, saved, "optim.state.{}.step")
            for n, target in there.items():
                state_targets.setdefault(n, {})["step"] = target
    return masters


def _has_state(name: str, saved: dict) -> bool:
    """Whether the checkpoint holds optimizer state for parameter `name` (under its name or its parts')."""
    try:
        regroup({name: torch.zeros(())}, saved, "optim.state.{}.step")
    except ValueError:
        return False
    return True


def regroup(here: dict, saved: dict, key: str) -> tuple[dict, Callable[[dict], dict]]:
    """DCP load targets in the checkpoint's names for `here` (full tensors, one per parameter, named
    as this model names them), and a function of the loaded targets that returns `here`'s values.
    key: the checkpoint's flattened key of a name ("model.{}"). A SplitLinear part's rows are a
    slice of the fused tensor's, in part order; a 0-dim tensor (an optimizer's step) is one value
    for the fused layer and each of its parts. A name or shape that does not match raises ValueError,
    which load() reports as it reports DCP's ("<path> does not fit this model and optimizer: ..."; a
    CheckpointError from here was passed on as it was, naming neither the checkpoint nor that)."""
    there, value_of = {}, {}  # value_of: here name -> its value, a function of the loaded targets
    # the checkpoint's fused name -> this model's names of its parts, in order
    parts_here = split_parts(name for name in here if key.format(name) not in saved)
    for fused, names in parts_here.items():
        if key.format(fused) not in saved:
            raise ValueError(f"{key.format(fused)} is not in the checkpoint")
        there[fused] = torch.empty(tuple(saved[key.format(fused)].size), dtype=here[names[0]].dtype)
        if there[fused].dim() == 0:
            # One step tensor per part: torch's AdamW adds 1 to each parameter's in place, and a shared one
            # (torch's load keeps the tensor it is given) counted every part's step (the bias corrections drifted).
            value_of |= {name: lambda loaded, f=fused: loaded[f].clone() for name in names}
            continue
        rows = [here[name].shape[0] for name in names]
        if sum(rows) != there[fused].shape[0]:
            raise ValueError(f"{key.format(fused)} in the checkpoint has {there[fused].shape[0]} rows, this "
                             f"model's parts of it {sum(rows)}")
        for name, start, n in zip(names, itertools.accumulate(rows, initial=0), rows):
            value_of[name] = lambda loaded, f=fused, a=start, n=n: loaded[f][a:a + n]
    for name, t in here.items():
        if name in value_of:
            continue
        if key.format(name) in saved:  # the same name on both sides
            there[name] = t
            value_of[name] = lambda loaded, n=name: loaded[n]
            continue
        head, dot, leaf = name.rpartition(".")  # a fused tensor the checkpoint holds as parts
        parts = []
        # (a parameter of the root module, "scale", has no layer to be split: rsplit raised "not enough
        # values to unpack" for it, naming neither the tensor nor the checkpoint)
        while dot and key.format(f"{head}.parts.{len(parts)}.{leaf}") in saved:
            parts.append(f"{head}.parts.{len(parts)}.{leaf}")
        if not parts:
            raise ValueError(f"{key.format(name)} is not in the checkpoint")
        if t.dim() == 0:
            there[parts[0]] = t
            value_of[name] = lambda loaded, p=parts[0]: loaded[p]
            continue
        rows = [saved[key.format(p)].size[0] for p in parts]
        if sum(rows) != t.shape[0]:
            raise ValueError(f"the parts of {key.format(name)} in the checkpoint have {sum(rows)} rows, "
                             f"this model's {t.shape[0]}")
        for p, start, n in zip(parts, itertools.accumulate(rows, initial=0), rows):
            there[p] = t[start:start + n]  # DCP reads each part into its rows, in place
        value_of[name] = lambda loaded, t=t: t
    return there, lambda loaded: {name: value(loaded) for name, value in value_of.items()}
