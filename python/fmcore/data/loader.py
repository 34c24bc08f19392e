"""fmcore.data.Loader: batches of token windows from a sharded dataset, computed ahead by C++ threads.

Batch i of rank r holds the global samples ``start + (i*world_size + r)*B + b`` (b < B); where a sample
lives is a pure function of (seed, mode, seq_len, the dataset), see csrc/data/plan.h. Hence:
- the same (seed, rank, world_size) gives the same batches whatever the thread count;
- ranks are disjoint and, in sequential mode, jointly read every window of every epoch exactly once;
- the state is one number (the next global sample), identical on every rank: resuming restarts the
  workers there, and the next batch equals the one an uninterrupted loader would have returned. A
  state may be loaded with another batch_size or world_size: reading continues at the same sample.

Sequential mode: every epoch visits the shards in an order shuffled by (seed, epoch); windows of
T + 1 tokens start every T tokens inside a shard and are read in order; epochs follow each other
without a partial batch. Random mode: each window starts at a uniformly drawn position.

A blend: dataset = [(directory, weight), ...] (or a dict {directory: weight}, in its order) mixes sources
per sample (csrc/data/blend.h). A period of BLEND_PERIOD samples is laid out once, slot i going to the
source furthest below its share after i slots (Megatron's rule); sample g comes from source
s(g) = table[g % P] and is its sample j(g) = (g // P) * count_s + (its slots before g % P), located by
that source's own plan as above. Each source's share is within 1/P of its normalised weight over whole
periods, each cycles its own epochs (a heavier one faster), and the state is still the one number g. Every
source needs the same tokenizer (vocab size, EOS and BOS ids in its manifest). A weight may be 0 (a source
read by nobody, as one dropped by an annealing phase) as long as one is > 0.

Mix phases (an annealing or mid-training phase on other weights): a state resumes by default only on the same
sources and with the same weights, since under other weights the same g is other data. With
load_state_dict(state, mix_change=True) a loader of other weights resumes from g on under its weights: the
blend becomes a list of phases [(G_k, weights_k)], phase k's samples g mapping as above with g - G_k and
each source's j counted on from the samples it drew before G_k, so that every source continues exactly where
it left off (none of its samples repeated or skipped at the switch). The state carries the phase list, and
later resumes read the same samples again. Such a resume may also add sources (a high-quality one for the last
phase; a one-source state becomes a blend): the state's sources, matched by their fingerprints, must stay the
first ones and in their order (source s's samples are seeded by s), each added one weighs 0 in the earlier
phases and starts at its sample 0. A source is never removed: weight 0 stops reading it.

With doc_boundaries, each row is split into segments at document starts (the shard's stored offsets,
or after each EOS token for shards without them; a row's start always opens a segment): positions
restart at 0 in every segment and cu_seqlens (int32, the segment ends in the flattened B*T batch,
leading 0) feeds flash_attention_varlen with max_seqlen.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import numbers
import operator
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from fmcore import _C
from fmcore.data.shards import ShardError, load_manifest, split_shards

_DTYPE_BYTES = {torch.int64: 8, torch.int32: 4}
BLEND_PERIOD = 1000  # the blend's period in samples (csrc/data/blend.h kPeriod)
_FORKED = "a Loader cannot be used in a process forked after it was created: create it in the child"


@dataclass(frozen=True)
class Source:
    """One source of a loader: its name (the directory's name; the whole path where two share a name), the
    directory, its share of the samples (the weights normalised to sum 1) and its number of shards."""
    name: str
    path: Path
    weight: float
    shards: int


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) input tokens, int64 (or int32); pinned when CUDA is available
    y: torch.Tensor  # (B, T) next-token targets: y[b, t] is the token after x[b, t]
    positions: torch.Tensor | None = None  # (B, T) position within the segment (doc_boundaries only)
    cu_seqlens: torch.Tensor | None = None  # (n_segments + 1,) int32 segment ends in the flattened batch
    max_seqlen: int | None = None  # longest segment (doc_boundaries only)


def default_threads() -> int:
    """The usable cores shared among the local ranks (LOCAL_WORLD_SIZE, set by torchrun), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores // local))


class Loader:
    """Iterable of Batch from dataset (a directory with manifest.json, or of llm.c *train*/*val* .bin), or from
    a weighted blend of such directories: a list of (directory, weight) pairs or a dict {directory: weight}
    (see the module's docstring; .sources lists them with their normalised weights).

    threads: worker threads (None: default_threads()); prefetch: batches computed ahead (None: 2*threads
    + 2); both at least 1 (no "0 workers" as DataLoader's num_workers=0); check_vocab: every token read
    is checked < vocab size (an error names the file and offset); verify: checksum every shard when
    opening; pin_memory: default torch.cuda.is_available().
    """

    def __init__(self, dataset, split: str = "train", batch_size: int = 8, seq_len: int = 1024, *,
                 mode: str = "sequential", seed: int = 0, rank: int = 0, world_size: int = 1,
                 threads: int | None = None, doc_boundaries: bool = False, dtype: torch.dtype = torch.int64,
                 prefetch: int | None = None, check_vocab: bool = False, verify: bool = False,
                 pin_memory: bool | None = None):
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"dtype must be torch.int64 or torch.int32, got {dtype}")
        if mode not in ("sequential", "random"):
            raise ValueError(f"mode must be 'sequential' or 'random', got {mode!r}")
        ints = dict(batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank, world_size=world_size,
                    threads=threads, prefetch=prefetch)
        for name, value in ints.items():  # (the C++ core checks the ranges; pybind's own type error names none)
            if name in ("threads", "prefetch") and value is None:
                continue  # the default, chosen below
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            # 0 once meant the default silently (`threads or default_threads()`): DataLoader's users read
            # num_workers=0 as "no workers", and a count the caller set was not the one used.
            if name in ("threads", "prefetch") and value < 1:
                default = "default_threads()" if name == "threads" else "2 * threads + 2"
                raise ValueError(f"{name} must be >= 1 (None means the default, {default}), got {value}")
            # Past the C++ type (int for threads and prefetch, int64 else) pybind's error names no argument.
            bits = 31 if name in ("threads", "prefetch") else 63
            if name != "seed" and not -2**bits <= value < 2**bits:
                raise ValueError(f"{name} must be in [-2^{bits}, 2^{bits}), got {value}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2^64), got {seed}")
        blend = _parse_blend(dataset)
        self.split = split
        # One (manifest, shard paths) per source; the shard lists are concatenated for the C++ core, each
        # source a contiguous range of it.
        opened = [split_shards(path, split) for path, _ in blend]
        tok = _common_tokenizer(blend, [manifest for manifest, _ in opened])
        shares = _shares(blend)
        self.sources = [Source(name, path, share, len(paths))
                        for (path, _), (_, paths), share, name in zip(blend, opened, shares, _source_names(blend))]
        self.dataset = self.sources[0].path if len(blend) == 1 else [source.path for source in self.sources]
        paths = [p for _, source_paths in opened for p in source_paths]
        self.vocab_size: int | None = tok.get("vocab_size")
        self.eos_id: int | None = tok.get("eos_id")
        self.bos_id: int | None = tok.get("bos_id")  # the token in front of every document, if any
        self.batch_size, self.seq_len, self.mode, self.seed = batch_size, seq_len, mode, seed
        self.rank, self.world_size, self.dtype = rank, world_size, dtype
        self.threads = default_threads() if threads is None else threads
        fingerprints = [_fingerprint(manifest["splits"][split]) for manifest, _ in opened]
        # Version 1 states named the sources and their shares; version 2 states the sources, and their phases;
        # version 3 states also list each source's (name, fingerprint): a resume that adds sources matches them.
        self._source_fingerprints = fingerprints
        self._fingerprint_v1 = fingerprints[0] if len(blend) == 1 else _blend_fingerprint(self.sources, fingerprints)
        self._fingerprint = fingerprints[0] if len(blend) == 1 else _blend_sources(self.sources, fingerprints)
        # As given (data.mix's, bitwise: the period is built from their shares); one source weighs all.
        self._weights = [float(weight) for _, weight in blend] if len(blend) > 1 else [1.0]
        # [(first global sample, its weights)]: one phase until a resume changes the mix.
        self._phases = [(0, self._weights)]
        pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        if pin_memory:
            torch.cuda.init()  # the workers allocate pinned buffers: initialise CUDA here, not in a worker
        try:
            self._core = _C.TokenLoader(
                [str(p) for p in paths], batch_size, seq_len, mode, seed, rank, world_size, self.threads,
                2 * self.threads + 2 if prefetch is None else prefetch, doc_boundaries, _DTYPE_BYTES[dtype],
                check_vocab, self.vocab_size or 0, -1 if self.eos_id is None else self.eos_id, verify, 0, pin_memory,
                [source.shards for source in self.sources] if len(blend) > 1 else [],
                *_phase_lists(self._phases if len(blend) > 1 else []))
        except ShardError as e:
            raise _with_mmap_hint(e, len(paths)) from None
        if dtype == torch.int32:
            # The C++ core casts each uint32 token to the output type: ids >= 2^31 would turn negative.
            for info in self._core.shard_infos():
                vocab = self.vocab_size or info["vocab_size"]
                if not 0 < vocab <= 2**31:
                    self._core.close()
                    raise ValueError(f"dtype torch.int32 holds token ids below 2^31, but {info['path']} has vocab size "
                                     f"{vocab or 'unknown (0 at offset 24, uint32 ids)'}: use torch.int64")
        # The C++ worker threads exist only in this process: a forked child (multiprocessing, DataLoader
        # workers) inherits the object but not the threads, so there next() would wait forever and
        # close() would join threads that are not there.
        self._pid = os.getpid()
        # Joins the worker threads when the loader is collected, closed, or at interpreter exit.
        self._finalizer = weakref.finalize(self, _close_core, self._core, self._pid)
        self._closed = False  # by close(): the finalizer having run without it means interpreter exit

    @staticmethod
    def manifest(dataset) -> dict:
        return load_manifest(dataset)

    def __iter__(self):
        return self

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(_FORKED)

    def __next__(self) -> Batch:
        self._check_process()
        try:
            x, y, positions, cu_seqlens, max_seqlen = self._core.next()
        except RuntimeError:
            # The finalizer ran and close() did not call it: nothing collects a loader that a thread is
            # in next() of, so this is the interpreter's exit closing it under a daemon thread. That
            # thread dies with the process; raising printed "the loader is closed" as its traceback
            # on every such exit. It waits here instead, as it would have if the loader had stayed open.
            # (Not the main thread: an atexit handler of its own reading the loader would hang the exit.)
            if not self._closed and not self._finalizer.alive and threading.current_thread().daemon:
                threading.Event().wait()
            raise
        return Batch(x, y, positions, cu_seqlens, max_seqlen)

    @property
    def wait_seconds(self) -> float:
        """Cumulative seconds the consumer waited in next() for a batch not ready yet."""
        self._check_process()
        return self._core.wait_seconds

    @property
    def epoch(self) -> float:
        """Sequential mode: epochs read so far by all ranks together (fractional): next sample / windows_per_epoch.
        For a blend, 1.0 is where every source has been read whole at least once (see source_epochs)."""
        self._check_process()
        return self._core.next_sample / self._core.windows_per_epoch

    @property
    def windows_per_epoch(self) -> int:
        """Sequential mode: the windows of seq_len + 1 tokens in one epoch, all ranks together. For a blend, the
        global samples until every source has read its whole epoch (the source slowest to cycle sets it: the one
        of the most windows per unit of weight); the sources with more weight have cycled faster by then. Over mix
        phases, each source's last window is where the phase that draws it puts it; a source that a phase dropped
        (weight 0) before it read its epoch is not waited for."""
        self._check_process()
        return self._core.windows_per_epoch

    @property
    def source_epochs(self) -> dict[str, float]:
        """Sequential mode: each source's own epochs read so far by all ranks together (fractional), by source
        name; every source cycles its epochs independently, at its weight's pace."""
        self._check_process()
        taken = self._core.source_samples(self._core.next_sample)
        return {source.name: n / windows
                for source, n, windows in zip(self.sources, taken, self._core.source_windows_per_epoch)}

    @property
    def batches_per_epoch(self) -> int:
        """Sequential mode: whole batches of this rank in one epoch (e.g. the length of a full val pass)."""
        self._check_process()
        return self._core.windows_per_epoch // (self.world_size * self.batch_size)

    @property
    def mix_phases(self) -> list[tuple[int, dict[str, float]]]:
        """The blend's phases: [(first global sample, {source name: share})], one until a resume changed the mix."""
        names = [source.name for source in self.sources]
        return [(start, dict(zip(names, _shares_of(weights)))) for start, weights in self._phases]

    def state_dict(self) -> dict:
        self._check_process()
        return {"version": 3, "sample": self._core.next_sample, "mode": self.mode, "seed": self.seed,
                "seq_len": self.seq_len, "split": self.split, "dataset": self._fingerprint,
                "sources": [[source.name, fp] for source, fp in zip(self.sources, self._source_fingerprints)],
                "phases": [[start, list(weights)] for start, weights in self._phases]}

    def load_state_dict(self, state: dict, mix_change: bool = False) -> str | None:
        """Resumes at the state's sample. A state of the same sources under other weights is refused unless
        mix_change: then this loader's weights make a new phase from the state's sample on (see the module's
        docstring), and the change is returned as "a=0.7,b=0.3 -> a=0.3,b=0.7" (None when the mix is the same).
        With mix_change this loader may also add sources after the state's (its first ones, in their order): the
        earlier phases give them weight 0, and the change names them ("a=1 -> a=0.8,c=0.2 (adds c)")."""
        self._check_process()
        version = state.get("version")
        if version not in (1, 2, 3):
            raise ValueError(f"loader state version {version!r}, expected 1, 2 or 3")
        keys = ("sample", "mode", "seed", "seq_len", "split", "dataset") + (("phases",) if version >= 2 else ()) + (
            ("sources",) if version == 3 else ())
        missing = [key for key in keys if key not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}: not a state_dict() of a Loader")
        # int() would have truncated 1.5 and parsed "5"; a negative sample failed in pybind naming no argument.
        sample = state["sample"]
        try:
            sample = operator.index(sample) if not isinstance(sample, bool) else None  # int, numpy int
        except TypeError:
            sample = None
        if sample is None or not 0 <= sample < 2**64:
            raise ValueError(f"loader state sample must be an int in [0, 2^64), got {state['sample']!r}")
        for key in ("mode", "seed", "seq_len", "split"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with a different {key}: {state[key]!r}, this loader has "
                                 f"{getattr(self, key)!r}")
        n = len(self.sources)
        if state["dataset"] == (self._fingerprint_v1 if version == 1 else self._fingerprint):
            saved_n = n
        else:
            saved_n = self._saved_sources(state, version, sample, mix_change)
        if version == 1:  # one implicit phase, whose shares its fingerprint names (or one source's: all of them)
            phases = [(0, self._weights if saved_n == n else [1.0])]
        else:
            phases = _checked_phases(state["phases"], saved_n, sample)
        saved = phases[-1][1]
        before = _describe(self.sources, saved)
        # The added sources (at the end) weigh 0 in every earlier phase: no sample before this one was theirs.
        phases = [(start, weights + [0.0] * (n - saved_n)) for start, weights in phases]
        change = None
        if _shares_of(phases[-1][1]) != _shares_of(self._weights) or saved_n < n:
            after = _describe(self.sources, self._weights)
            if not mix_change:
                raise ValueError(f"loader state was saved with the mix {before} (from sample {phases[-1][0]}), this "
                                 f"loader has {after}: under other weights the same sample is other data; to change "
                                 f"the mix from sample {sample} on (an annealing phase), pass mix_change=True to "
                                 "load_state_dict (the trainer's data.mix_change = true)")
            added = ", ".join(source.name for source in self.sources[saved_n:])
            change = f"{before} -> {after}" + (f" (adds {added})" if added else "")
            # A phase no sample was read in (a checkpoint saved right at a change) is replaced, not followed;
            # back to the phase before it, that one goes on (a new phase would restart its period).
            phases = phases[:-1] if phases[-1][0] == sample else phases
            if not phases or _shares_of(phases[-1][1]) != _shares_of(self._weights):
                phases.append((sample, self._weights))
        if n > 1:
            self._core.restart(sample, *_phase_lists(phases))
        else:
            self._core.restart(sample)
        self._phases = phases
        return change

    def _saved_sources(self, state: dict, version: int, sample: int, mix_change: bool) -> int:
        """The number of the state's sources when this loader's first ones are the state's (matched by fingerprint)
        and it adds more after them with mix_change; any other change of the sources raises, saying why."""
        here = self._fingerprint_v1 if version == 1 else self._fingerprint
        refused = f"loader state was saved with a different dataset: {state['dataset']!r}, this loader has {here!r}"
        saved = _state_sources(state, version)
        if saved is None:  # a blend's state of version 1 or 2: it lists no source's fingerprint
            if not mix_change:
                raise ValueError(f"{refused} (with mix_change=True a resume may change a mix's weights and add sources "
                                 "after the state's; it never removes or reorders them)")
            raise ValueError(refused + (
                " (a state written before mix phases (version 1) resumes only on its own mix: resume it so and save, "
                "then change the mix)" if version == 1 else
                " (a state written before sources could be added (version 2) resumes only on its own sources: resume "
                "it so and save, then add sources)"))
        fingerprints = self._source_fingerprints
        here_by_name = {source.name: fp for source, fp in zip(self.sources, fingerprints)}
        for name, fp in saved:
            if fp not in fingerprints and name in here_by_name:
                # (not "lacks the state's source ... cannot remove a source": said of a run on one dataset that
                # `fmcore prepare --overwrite` rewrote, that advice about a mix's weights misled)
                raise ValueError(f"{refused}: source {name} is other data than the state's ({here_by_name[name]}, "
                                 f"the state's {fp}: its shards' names or token counts differ, as after a new "
                                 "`fmcore prepare` into its directory)")
            if fp not in fingerprints:
                raise ValueError(f"{refused}: this loader lacks the state's source {f'{name} ' if name else ''}[{fp}]; "
                                 "a resume cannot remove a source (give it weight 0 to stop reading it)")
        if [fp for _, fp in saved] == fingerprints:
            raise ValueError(f"{refused}: the same sources under other names (a state resumes on its sources' "
                             "directory names)")
        if len(saved) > len(fingerprints) or [fp for _, fp in saved] != fingerprints[:len(saved)]:
            raise ValueError(f"{refused}: the state's sources must stay this loader's first {len(saved)}, in their "
                             "order (each source's samples are seeded by its place), any added source after them")
        if not mix_change:
            added = ", ".join(source.name for source in self.sources[len(saved):])
            raise ValueError(f"{refused}: this loader adds {added}; to add sources from sample {sample} on, pass "
                             "mix_change=True to load_state_dict (the trainer's data.mix_change = true)")
        return len(saved)

    def __reduce_ex__(self, protocol):
        # A DataLoader worker started with spawn or forkserver pickles its dataset: a Loader in it
        # failed with pybind's "cannot pickle 'fmcore._C.TokenLoader' object", which names neither the
        # Loader nor what to do. (copy.copy and deepcopy come here too: a copy sharing the C++ core
        # would read, restart and close the original's batches.)
        raise TypeError("a Loader cannot be pickled or copied: its worker threads and open shards belong to the "
                        "process that created it; create it where it is used (in a DataLoader worker: in the "
                        "dataset's __iter__, not its __init__)")

    def close(self) -> None:
        self._closed = True
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_core(core, pid: int) -> None:
    """The finalizer: joins the worker threads in the process that started them. In a forked child the core
    is leaked instead: its close() and its C++ destructor would both join threads that do not exist there
    (an abort or a hang), and a mutex a parent thread held at the fork may stay locked forever."""
    if os.getpid() == pid:
        core.close()
    else:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(core))  # a reference never dropped: no destructor


def _with_mmap_hint(e: ShardError, n_shards: int) -> ShardError:
    """The loader maps every shard of the split: ENOMEM from mmap is most often the kernel's limit on a
    process's memory maps (vm.max_map_count, 65530 by default) with many small shards, which the bare
    "Cannot allocate memory" does not suggest."""
    if f"cannot mmap: {os.strerror(errno.ENOMEM)}" not in str(e):
        return e
    try:
        limit = f" = {int(Path('/proc/sys/vm/max_map_count').read_text())}"
    except (OSError, ValueError):
        limit = ""
    return ShardError(f"{e} (the process may have reached the kernel's limit on memory maps, "
                      f"vm.max_map_count{limit}: the loader maps each shard, {n_shards} in this split; use fewer, "
                      "larger shards (`fmcore prepare --shard-tokens`) or raise the limit with sysctl; an "
                      "address-space limit, ulimit -v, fails the same way)")


def _parse_blend(dataset) -> list[tuple[Path, float]]:
    """[(directory, weight)] from one directory (weight 1) or from a list of (directory, weight) pairs (a dict
    {directory: weight} is taken in its order). Weights must be finite and >= 0, one > 0, and each > 0 at least
    1/BLEND_PERIOD of their total (a smaller one would get no sample of the blend's period); errors name the
    source."""
    if isinstance(dataset, (str, os.PathLike)):
        return [(Path(dataset), 1.0)]
    pairs = list(dataset.items()) if isinstance(dataset, dict) else dataset
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError("dataset must be a directory, or a non-empty list of (directory, weight) pairs, got "
                         f"{dataset!r}")
    blend = []
    for k, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], (str, os.PathLike)):
            raise ValueError(f"dataset source {k}: expected a (directory, weight) pair, got {pair!r}")
        path, weight = Path(pair[0]), pair[1]
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) \
                or weight < 0:
            raise ValueError(f"dataset source {k} ({path}): weight must be a finite number >= 0, got {weight!r}")
        # (Listed twice, a directory was read as two sources with epochs of their own, repeating its windows
        # within an epoch, and reported under one name: mix_phases showed one of its weights)
        again = next((j for j, (seen, _) in enumerate(blend) if os.path.realpath(seen) == os.path.realpath(path)), None)
        if again is not None:
            raise ValueError(f"dataset source {k} ({path}) is source {again}'s directory again: list it once, with the "
                             "sum of its weights")
        blend.append((path, float(weight)))
    if not math.isfinite(sum(weight for _, weight in blend)):
        raise ValueError(f"dataset: the weights' total overflows: {[weight for _, weight in blend]}")
    if not sum(weight for _, weight in blend) > 0:
        raise ValueError(f"dataset: every weight is 0 ({[str(path) for path, _ in blend]}): one must be > 0")
    for (path, _), share in zip(blend, _shares(blend)):
        if 0 < share * BLEND_PERIOD < 1:
            raise ValueError(f"dataset source {path}: weight is {share:.3g} of the total, below 1/{BLEND_PERIOD}: "
                             f"it would get no sample of the blend's period of {BLEND_PERIOD} samples")
    return blend


def _shares(blend: list[tuple[Path, float]]) -> list[float]:
    """The weights normalised to sum 1, summed in order as the C++ core does (sum() compensates since 3.12)."""
    return _shares_of([weight for _, weight in blend])


def _shares_of(weights: list[float]) -> list[float]:
    """_shares of bare weights: equal shares build the same period (the C++ core builds it from them)."""
    total = 0.0
    for weight in weights:
        total += weight
    return [weight / total for weight in weights]


def _describe(sources: list[Source], weights: list[float]) -> str:
    """A mix as data.mix spells it, by source name: "a=0.7,b=0.3"."""
    return ",".join(f"{s.name}={share:.6g}" for s, share in zip(sources, _shares_of(weights)))


def _phase_lists(phases: list[tuple[int, list[float]]]) -> tuple[list[int], list[list[float]]]:
    """The C++ core's phase_starts and phase_weights."""
    return [start for start, _ in phases], [list(weights) for _, weights in phases]


def _checked_phases(phases, n_sources: int, sample: int) -> list[tuple[int, list[float]]]:
    """A state's phase list, its shape checked (the C++ core checks the starts' order and the weights)."""
    ok = isinstance(phases, (list, tuple)) and phases and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
        and isinstance(p[1], (list, tuple)) and len(p[1]) == n_sources
        and all(isinstance(w, numbers.Real) and not isinstance(w, bool) for w in p[1]) for p in phases)
    if not ok or phases[0][0] != 0 or phases[-1][0] > sample:
        raise ValueError(f"loader state phases must be [[start, [one weight per source ({n_sources})]], ...] from "
                         f"start 0 to at most the sample {sample}, got {phases!r}")
    for start, weights in phases:
        # (The C++ core checks them too, but too late: the mix comparison divides by their total first, a
        # ZeroDivisionError for a state's all-0 weights, and a one-source loader never passes its phases on.)
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not 0 < sum(weights) < math.inf:
            raise ValueError(f"loader state phase from sample {start}: weights must be finite, >= 0 and one > 0, "
                             f"got {weights!r}")
    return [(start, [float(w) for w in weights]) for start, weights in phases]


def _state_sources(state: dict, version: int) -> list[tuple[str, str]] | None:
    """A state's [(source name, fingerprint)]: version 3 lists them; before, a one-source state's dataset is its
    fingerprint (its name unknown), and a blend's names no source's on its own (None)."""
    if version < 3:
        fp = state["dataset"]
        return [("", fp)] if isinstance(fp, str) and not fp.startswith("blend ") else None
    sources = state["sources"]
    if not (isinstance(sources, (list, tuple)) and sources and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, str) for v in p) for p in sources)):
        raise ValueError(f"loader state sources must be [[name, fingerprint], ...], got {sources!r}")
    return [(name, fp) for name, fp in sources]


def _source_names(blend: list[tuple[Path, float]]) -> list[str]:
    names = [path.name or str(path) for path, _ in blend]
    return [name if names.count(name) == 1 else str(path) for name, (path, _) in zip(names, blend)]


def _common_tokenizer(blend: list[tuple[Path, float]], manifests: list[dict]) -> dict:
    """The sources' tokenizer (the first's manifest entry); a source whose vocab size, EOS or BOS id differs
    is an error naming it: its token ids would mean other tokens to the model."""
    first = manifests[0].get("tokenizer", {})
    for (path, _), manifest in zip(blend[1:], manifests[1:]):
        tok = manifest.get("tokenizer", {})
        for key in ("vocab_size", "eos_id", "bos_id"):
            if tok.get(key) != first.get(key):
                raise ShardError(f"dataset source {path}: tokenizer {key} {tok.get(key)!r} differs from "
                                 f"{first.get(key)!r} of {blend[0][0]} (every source of a blend needs the same "
                                 "tokenizer)")
    return first


def _blend_fingerprint(sources: list[Source], fingerprints: list[str]) -> str:
    """A version 1 state's: names each source's shards and exact share (its one phase's weights)."""
    return "blend " + ", ".join(f"{s.name}[{fp}]={s.weight!r}" for s, fp in zip(sources, fingerprints))


def _blend_sources(sources: list[Source], fingerprints: list[str]) -> str:
    """Names each source's shards, in order: a state resumes only on the same sources (its phases carry the
    weights)."""
    return "blend " + ", ".join(f"{s.name}[{fp}]" for s, fp in zip(sources, fingerprints))


def _fingerprint(split: dict) -> str:
    """Identifies the shards of a split (names and token counts): a state only resumes on the same data."""
    shards = [(s["file"], s["tokens"]) for s in split["shards"]]
    return hashlib.blake2b(json.dumps(shards).encode(), digest_size=8).hexdigest()
