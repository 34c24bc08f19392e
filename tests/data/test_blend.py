"""Weighted blends in fmcore.data.Loader (csrc/data/blend.h): per-source shares, the sample -> (source, its
sample) rule against a pure-Python model, contents against each source read alone, thread-count independence,
exact resume, resharding, disjoint ranks, document boundaries, per-source epochs and every refused blend."""

import math

import numpy as np
import pytest
import torch

from fmcore.data import Loader, ShardError, write_dataset
from fmcore.data.loader import BLEND_PERIOD

T = 16
# Token ranges far apart: a window's first token names its source (x[0] // SPAN) and its position.
SPAN = 1 << 20
# Shard sizes that never divide into windows evenly; the sources differ in size so their epochs differ.
SIZES = {"a": [300, 517], "b": [200, 161, 90], "c": [129]}


def _write(root, k, sizes, **kw):
    """Dataset k: tokens k * SPAN + position, documents starting every 37 tokens (for doc_boundaries)."""
    offsets = np.cumsum([0] + sizes)
    shards = []
    for n, start in zip(sizes, offsets):
        tokens = k * SPAN + np.arange(start, start + n)
        shards.append((tokens, np.arange(0, n, 37)))
    return write_dataset(root, {"train": shards, "val": shards[:1]}, vocab_size=4 * SPAN, eos_id=0, **kw)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    return {name: _write(root / name, k, sizes) for k, (name, sizes) in enumerate(SIZES.items())}


# ---- the pure-Python model of the rule (blend.h)

def model_table(weights, period=BLEND_PERIOD):
    """(table, rank, count): slot i to the source furthest below its share after i slots, ties to the lowest."""
    total = 0.0
    for w in weights:  # summed in order, as the C++ core does
        total += w
    share = [w / total for w in weights]
    count, table, rank = [0] * len(weights), [], []
    for i in range(period):
        best, best_deficit = 0, -math.inf
        for s, w in enumerate(share):
            deficit = w * (i + 1) - count[s]
            if deficit > best_deficit:
                best, best_deficit = s, deficit
        table.append(best)
        rank.append(count[best])
        count[best] += 1
    return table, rank, count


def model_pick(g, model, period=BLEND_PERIOD):
    table, rank, count = model
    s = table[g % period]
    return s, (g // period) * count[s] + rank[g % period]


def rows(loader, n_batches):
    """(x rows, positions rows or None) of n_batches batches, flattened to one row per sample."""
    xs, ps = [], []
    for _ in range(n_batches):
        b = next(loader)
        xs.append(b.x)
        if b.positions is not None:
            # cu_seqlens must be where positions restart, in the flattened batch.
            starts = (b.positions.flatten() == 0).nonzero().flatten().to(torch.int32)
            assert torch.equal(b.cu_seqlens, torch.cat([starts, torch.tensor([b.x.numel()], dtype=torch.int32)]))
            ps.append(b.positions)
    return torch.cat(xs), torch.cat(ps) if ps else None


# ---- shares and the rule

@pytest.mark.parametrize("weights", [(0.7, 0.3), (3, 2, 1), (0.001, 0.999), (1, 1, 1)])
def test_table_matches_the_model_and_the_shares_the_weights(dirs, weights):
    names = list(SIZES)[: len(weights)]
    with Loader([(dirs[n], w) for n, w in zip(names, weights)], batch_size=50, seq_len=T, threads=2) as loader:
        model = model_table(weights)
        assert loader._core.blend_table == model[0]
        share = [s.weight for s in loader.sources]
        assert sum(share) == pytest.approx(1) and share == pytest.approx([w / sum(weights) for w in weights])
        # Two whole periods read through batches: each source's share is within 1/P of its weight.
        x, _ = rows(loader, 2 * BLEND_PERIOD // 50)
    source = (x[:, 0] // SPAN).tolist()
    for s, w in enumerate(share):
        assert abs(source.count(s) / len(source) - w) <= 1 / BLEND_PERIOD, (s, w)
    # And in any prefix the count is within one sample of the weight's (the greedy rule's bound).
    for n in (1, 17, 999, 1234, 1999):
        for s, w in enumerate(share):
            assert abs(source[:n].count(s) - w * n) < 1 + 1e-9, (n, s)


@pytest.mark.parametrize("mode", ["sequential", "random"])
@pytest.mark.parametrize("doc_boundaries", [False, True])
def test_each_sample_is_its_sources_sample_per_the_model(dirs, mode, doc_boundaries):
    """Global sample g is sample j(g) of source s(g), read as Loader(source, seed=seed + s) alone reads it."""
    weights, seed, n = (0.5, 0.3, 0.2), 7, 2400
    blend = [(dirs[name], w) for name, w in zip(SIZES, weights)]
    kw = dict(seq_len=T, mode=mode, doc_boundaries=doc_boundaries)
    runs = []
    for threads, prefetch in ((1, 1), (3, 5)):  # the same batches whatever the thread count
        with Loader(blend, batch_size=40, seed=seed, threads=threads, prefetch=prefetch, **kw) as loader:
            runs.append(rows(loader, n // 40))
    for a, b in zip(runs[0], runs[1]):
        assert a is None and b is None or torch.equal(a, b)
    x, positions = runs[0]
    model = model_table(weights)
    picks = [model_pick(g, model) for g in range(n)]
    for s, name in enumerate(SIZES):
        wanted = max(j for src, j in picks if src == s) + 1
        with Loader(dirs[name], batch_size=50, seed=seed + s, threads=1, **kw) as alone:
            ax, ap = rows(alone, -(-wanted // 50))  # (one rank: batch i holds its samples 50i .. 50i + 49)
        for g in (g for g, (src, _) in enumerate(picks) if src == s):
            j = picks[g][1]
            assert torch.equal(x[g], ax[j]), (name, g, j)
            if doc_boundaries:
                assert torch.equal(positions[g], ap[j]), (name, g, j)


def test_core_pick_and_source_samples(dirs):
    weights = (0.62, 0.38)
    with Loader([(dirs["a"], weights[0]), (dirs["b"], weights[1])], batch_size=4, seq_len=T, threads=1) as loader:
        model = model_table(weights)
        for g in (0, 1, 2, 999, 1000, 1001, 123_456_789, 2**40 + 3):
            assert tuple(loader._core.pick(g)) == model_pick(g, model)
            counts = [0, 0]
            for h in range(g - g % BLEND_PERIOD, g):
                counts[model[0][h % BLEND_PERIOD]] += 1
            base = [(g // BLEND_PERIOD) * c for c in model[2]]
            assert loader._core.source_samples(g) == [b + c for b, c in zip(base, counts)]


def test_one_source_is_the_plain_loader(dirs):
    with Loader(dirs["a"], batch_size=8, seq_len=T, seed=3) as plain, \
            Loader([(dirs["a"], 2.5)], batch_size=8, seq_len=T, seed=3) as listed:
        assert torch.equal(rows(plain, 30)[0], rows(listed, 30)[0])
        assert plain.state_dict() == listed.state_dict()
        assert plain.windows_per_epoch == listed.windows_per_epoch
        assert listed.dataset == dirs["a"] and [s.weight for s in listed.sources] == [1.0]


def test_a_source_of_weight_0_is_never_read(dirs):
    with Loader(dirs["a"], batch_size=8, seq_len=T, seed=3) as plain, \
            Loader([(dirs["a"], 2.0), (dirs["b"], 0)], batch_size=8, seq_len=T, seed=3) as blend:
        assert torch.equal(rows(plain, 130)[0], rows(blend, 130)[0])  # 1040 samples: past a period
        assert blend._core.source_samples(1040) == [1040, 0] and blend.windows_per_epoch == plain.windows_per_epoch


def test_dict_form_is_the_list_form(dirs):
    with Loader({dirs["a"]: 3, dirs["b"]: 1}, batch_size=8, seq_len=T) as d, \
            Loader([(dirs["a"], 3), (dirs["b"], 1)], batch_size=8, seq_len=T) as lst:
        assert torch.equal(rows(d, 10)[0], rows(lst, 10)[0])
        assert [s.name for s in d.sources] == ["a", "b"]


# ---- state: resume, resharding, ranks

@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_resume_mid_stream(dirs, mode):
    blend = [(dirs["a"], 0.8), (dirs["c"], 0.2)]
    kw = dict(batch_size=24, seq_len=T, mode=mode, seed=5)
    with Loader(blend, **kw) as whole:
        expected = rows(whole, 70)[0]
    with Loader(blend, **kw) as first:
        rows(first, 43)  # mid-period: 43 * 24 = 1032
        state = first.state_dict()
    with Loader(blend, threads=3, **kw) as resumed:
        resumed.load_state_dict(state)
        assert torch.equal(rows(resumed, 27)[0], expected[43 * 24:])


def test_state_loaded_with_another_world_size_and_ranks_disjoint(dirs):
    blend = [(dirs["a"], 0.6), (dirs["b"], 0.4)]
    with Loader(blend, batch_size=6, seq_len=T, seed=1) as one:
        every = rows(one, 60)[0]  # samples 0..359 on one rank
    with Loader(blend, batch_size=6, seq_len=T, seed=1) as first:
        rows(first, 11)
        state = first.state_dict()  # next sample 66
    got = []
    for rank in range(3):  # resharded onto 3 ranks of 4 samples a batch
        with Loader(blend, batch_size=4, seq_len=T, seed=1, rank=rank, world_size=3) as loader:
            loader.load_state_dict(state)
            got.append(rows(loader, 20)[0])
    for rank in range(3):
        for i in range(20):  # batch i of rank r holds samples 66 + (3i + r) * 4 + b
            lo = 66 + (3 * i + rank) * 4
            assert torch.equal(got[rank][4 * i: 4 * i + 4], every[lo: lo + 4]), (rank, i)


def test_state_of_another_blend_is_refused(dirs):
    with Loader([(dirs["a"], 0.7), (dirs["b"], 0.3)], batch_size=4, seq_len=T) as loader:
        next(loader)
        state = loader.state_dict()
    assert "a[" in state["dataset"] and state["phases"] == [[0, [0.7, 0.3]]]  # the sources, then their weights
    others = [("saved with the mix", [(dirs["a"], 0.6), (dirs["b"], 0.4)]),
              ("different dataset", [(dirs["b"], 0.3), (dirs["a"], 0.7)]),
              ("different dataset", [(dirs["a"], 0.7), (dirs["c"], 0.3)]), ("different dataset", dirs["a"])]
    for match, other in others:
        with Loader(other, batch_size=4, seq_len=T) as loader:
            with pytest.raises(ValueError, match=match):
                loader.load_state_dict(state)
    # The same weights written otherwise (7:3) are the same blend.
    with Loader([(dirs["a"], 7), (dirs["b"], 3)], batch_size=4, seq_len=T) as loader:
        loader.load_state_dict(state)


# ---- epochs

def test_epochs_of_a_blend(dirs):
    weights = (0.9, 0.1)
    blend = [(dirs["a"], weights[0]), (dirs["b"], weights[1])]
    windows = []
    for name in ("a", "b"):
        with Loader(dirs[name], batch_size=1, seq_len=T) as alone:
            windows.append(alone.windows_per_epoch)
    model = model_table(weights)
    counts, g = [0, 0], 0
    while counts[0] < windows[0] or counts[1] < windows[1]:  # until both sources were read whole
        counts[model[0][g % BLEND_PERIOD]] += 1
        g += 1
    with Loader(blend, batch_size=10, seq_len=T) as loader:
        assert loader.windows_per_epoch == g
        x, _ = rows(loader, 25)
        n = 250
        taken = [sum(model[0][h % BLEND_PERIOD] == s for h in range(n)) for s in (0, 1)]
        assert loader.source_epochs == pytest.approx({"a": taken[0] / windows[0], "b": taken[1] / windows[1]})
        assert loader.epoch == pytest.approx(n / g)
        assert loader.source_epochs["a"] > 1 > loader.source_epochs["b"]  # the heavier source cycles faster
    # Source a's second epoch: every window of its first epoch once before any again.
    firsts = [int(v) for v in x[:, 0] if v < SPAN]
    assert len(set(firsts[: windows[0]])) == windows[0]


# ---- refused blends

def test_refused_blends_name_the_source(dirs, tmp_path):
    a, b = dirs["a"], dirs["b"]
    kw = dict(batch_size=2, seq_len=T)
    with pytest.raises(ValueError, match="non-empty list"):
        Loader([], **kw)
    with pytest.raises(ValueError, match="non-empty list"):
        Loader({}, **kw)
    for weight in (-1, float("nan"), float("inf"), True, "0.5", None):
        with pytest.raises(ValueError, match=rf"dataset source 1 \({b}\): weight must be a finite number >= 0"):
            Loader([(a, 1.0), (b, weight)], **kw)
    with pytest.raises(ValueError, match=r"dataset: every weight is 0 .*one must be > 0"):
        Loader([(a, 0), (b, 0.0)], **kw)
    for again in (a, str(a) + "/", a / ".." / a.name):  # (read as two sources, reported as one)
        with pytest.raises(ValueError, match=r"dataset source 2 \(.*\) is source 0's directory again: list it once"):
            Loader([(a, 1.0), (b, 1.0), (again, 3.0)], **kw)
    with pytest.raises(ValueError, match=r"dataset source 0: expected a \(directory, weight\) pair"):
        Loader([(a,)], **kw)
    with pytest.raises(ValueError, match=rf"dataset source {b}: weight is 0.0001 of the total, below 1/1000"):
        Loader([(a, 1.0), (b, 1e-4)], **kw)
    other_vocab = _write(tmp_path / "vocab", 3, [100])
    manifest = (other_vocab / "manifest.json")
    manifest.write_text(manifest.read_text().replace(f'"vocab_size": {4 * SPAN}', '"vocab_size": 1000'))
    with pytest.raises(ShardError, match=rf"dataset source {other_vocab}: tokenizer vocab_size 1000 differs"):
        Loader([(a, 1.0), (other_vocab, 1.0)], **kw)
    other_bos = _write(tmp_path / "bos", 3, [100], tokenizer={"bos_id": 1})
    with pytest.raises(ShardError, match=rf"dataset source {other_bos}: tokenizer bos_id 1 differs from None"):
        Loader([(a, 1.0), (other_bos, 1.0)], **kw)
    no_val = write_dataset(tmp_path / "noval", {"train": [np.arange(100)]}, vocab_size=4 * SPAN, eos_id=0)
    with pytest.raises(ShardError, match=rf"{no_val}.*no split 'val'"):
        Loader([(a, 1.0), (no_val, 1.0)], split="val", **kw)


# ---- mix phases: the weights changed at a resume (load_state_dict(state, mix_change=True))

def model_phases(phases):
    """pick(g) of a blend of phases [(G_k, weights_k)] (blend.h): the phase's own period from G_k on, each source's
    sample counted on from what it drew before G_k (counted here by walking every earlier sample)."""
    tables = [model_table(weights) for _, weights in phases]
    n = len(phases[0][1])
    bases = [[0] * n]
    for k in range(1, len(phases)):
        drawn = list(bases[-1])
        for local in range(phases[k][0] - phases[k - 1][0]):
            drawn[tables[k - 1][0][local % BLEND_PERIOD]] += 1
        bases.append(drawn)

    def pick(g):
        k = max(k for k, (start, _) in enumerate(phases) if start <= g)
        s, j = model_pick(g - phases[k][0], tables[k])
        return s, bases[k][s] + j

    return pick


def switched(dirs, phases, batch_size, **kw):
    """x rows of a loader resumed at each phase's start with that phase's weights (mix_change), reading until the
    last phase's start + 2 periods; and its final state."""
    names = list(SIZES)
    xs, state = [], None
    ends = [start for start, _ in phases[1:]] + [phases[-1][0] + 2 * BLEND_PERIOD]
    for (start, weights), end in zip(phases, ends):
        with Loader([(dirs[n], w) for n, w in zip(names, weights)], batch_size=batch_size, **kw) as loader:
            if state is not None:
                change = loader.load_state_dict(state, mix_change=True)
                wanted = ",".join(f"{n}={w / sum(weights):.6g}" for n, w in zip(names, weights))
                added = names[len(state["phases"][-1][1]):len(weights)]  # sources this phase adds, named
                assert change and change.endswith(f" -> {wanted}" + (f" (adds {', '.join(added)})" if added else ""))
            assert loader.state_dict()["sample"] == start
            xs.append(rows(loader, (end - start) // batch_size)[0])
            state = loader.state_dict()
            assert [s for s, _ in loader.mix_phases] == [s for s, _ in phases[: len(xs)]]
    return torch.cat(xs), state


# Phase starts that are not whole periods; source b is dropped by phase 1 and comes back in phase 2, c is dropped
# by phase 2.
PHASES = [(0, (0.5, 0.3, 0.2)), (1230, (0.1, 0.0, 0.9)), (2670, (0.6, 0.4, 0.0))]

def assert_each_source_reads_its_own_stream(dirs, x, source, seed, kw):
    """x's samples from source s (source[g] for sample g), in global order, are source s's samples read alone
    (a Loader of it, seeded seed + s as a blend seeds it)."""
    for s, name in enumerate(SIZES):
        mine = x[[g for g, src in enumerate(source) if src == s]]
        with Loader(dirs[name], batch_size=1, seed=seed + s, threads=1, **kw) as alone:
            assert torch.equal(mine, rows(alone, len(mine))[0]), name


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_a_mix_change_continues_every_source_where_it_left_off(dirs, mode):
    seed, kw = 11, dict(seq_len=T, mode=mode)
    x, state = switched(dirs, PHASES, 10, seed=seed, threads=2, **kw)
    pick = model_phases(PHASES)
    source = (x[:, 0] // SPAN).tolist()
    assert source == [pick(g)[0] for g in range(len(x))]
    # The source's samples in global order are exactly its own stream read alone: nothing repeated or skipped at
    # a switch, and b's stream goes on after the phase without it.
    assert_each_source_reads_its_own_stream(dirs, x, source, seed, kw)
    # Each phase's shares are its weights' within 1/P over its whole periods (phase 0: one, phase 2: two).
    for (start, weights), periods in zip(PHASES[::2], (1, 2)):
        part = source[start: start + periods * BLEND_PERIOD]
        for s, w in enumerate(weights):
            assert abs(part.count(s) / len(part) - w / sum(weights)) <= 1 / BLEND_PERIOD, (start, s)
    assert 1 not in source[PHASES[1][0]: PHASES[2][0]] and 2 not in source[PHASES[2][0]:]
    assert state["phases"] == [[start, list(weights)] for start, weights in PHASES]


def test_a_state_with_phases_resumes_identically_whatever_the_threads(dirs):
    names, last = list(SIZES), PHASES[-1][1]
    blend = [(dirs[n], w) for n, w in zip(names, last)]
    _, state = switched(dirs, PHASES[:2], 10, seq_len=T, threads=1)  # stopped in phase 1, its weights
    state["sample"] = 2000  # (inside phase 1)
    got = []
    for threads in (1, 3):
        with Loader(blend, batch_size=40, seq_len=T, threads=threads) as loader:
            loader.load_state_dict(state, mix_change=True)  # phase 2 from 2000 on
            x = rows(loader, 30)[0]
            resumed = loader.state_dict()
        with Loader(blend, batch_size=40, seq_len=T, threads=threads) as again:
            assert again.load_state_dict(resumed) is None  # the same mix: no change, no flag needed
            got.append((x, rows(again, 10)[0]))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    pick = model_phases([PHASES[0], PHASES[1], (2000, last)])
    whole = torch.cat([got[0][0], got[0][1]])
    assert (whole[:, 0] // SPAN).tolist() == [pick(g)[0] for g in range(2000, 2000 + 40 * 40)]
    assert resumed["phases"] == [[0, [0.5, 0.3, 0.2]], [1230, [0.1, 0.0, 0.9]], [2000, [0.6, 0.4, 0.0]]]
    with Loader(blend, batch_size=40, seq_len=T) as loader:
        assert loader.mix_phases[-1] == (0, {"a": 0.6, "b": 0.4, "c": 0.0})
        loader.load_state_dict(resumed)
        assert loader.mix_phases == [(0, {"a": 0.5, "b": 0.3, "c": 0.2}), (1230, {"a": 0.1, "b": 0.0, "c": 0.9}),
                                     (2000, {"a": 0.6, "b": 0.4, "c": 0.0})]
        assert loader._core.source_samples(2000 + 1600) == [sum(pick(g)[0] == s for g in range(3600)) for s in range(3)]


def test_a_mix_change_is_refused_without_the_opt_in(dirs):
    kw = dict(batch_size=4, seq_len=T)
    with Loader([(dirs["a"], 0.7), (dirs["b"], 0.3)], **kw) as loader:
        next(loader)
        state = loader.state_dict()
    with Loader([(dirs["a"], 0.2), (dirs["b"], 0.8)], **kw) as loader:
        with pytest.raises(ValueError, match=r"saved with the mix a=0.7,b=0.3 \(from sample 0\), this loader has "
                                             r"a=0.2,b=0.8.*pass mix_change=True.*data.mix_change = true"):
            loader.load_state_dict(state)
        assert loader.state_dict()["sample"] == 0 and len(loader.mix_phases) == 1  # nothing changed
    for other in ([(dirs["a"], 0.7), (dirs["c"], 0.3)], [(dirs["b"], 0.3), (dirs["a"], 0.7)], dirs["a"]):
        with Loader(other, **kw) as loader:  # sources removed or moved: refused, opt-in or not
            with pytest.raises(ValueError, match="different dataset.*(cannot remove|must stay)"):
                loader.load_state_dict(state, mix_change=True)
    bad = dict(state, phases=[[0, [0.7, 0.3]], [9, [0.2, 0.8]]])  # a phase after the sample (4)
    with Loader([(dirs["a"], 0.2), (dirs["b"], 0.8)], **kw) as loader:
        with pytest.raises(ValueError, match="loader state phases must be"):
            loader.load_state_dict(bad)
        for weights in ([0.0, 0.0], [math.nan, 1.0]):  # a damaged state: all-0 raised a ZeroDivisionError
            with pytest.raises(ValueError, match=r"loader state phase from sample 0: weights must be finite"):
                loader.load_state_dict(dict(state, phases=[[0, weights]]), mix_change=True)
        unordered = dict(state, phases=[[0, [0.7, 0.3]], [3, [0.5, 0.5]], [2, [0.2, 0.8]]])
        with pytest.raises(ValueError, match=r"blend phase 2 \(from sample 2\): phases must start at increasing"):
            loader.load_state_dict(unordered)  # (the C++ core's check: before anything stopped)
        with Loader([(dirs["a"], 0.2), (dirs["b"], 0.8)], **kw) as fresh:
            assert torch.equal(next(loader).x, next(fresh).x)


def test_a_change_at_the_changes_own_sample_replaces_it(dirs):
    """A checkpoint saved right at a change (no sample read in the new phase) changed again: one phase, not an
    empty one; and changed back, the phase before goes on as if never left."""
    kw = dict(batch_size=10, seq_len=T)
    with Loader([(dirs["a"], 0.7), (dirs["b"], 0.3)], **kw) as loader:
        rows(loader, 3)
        state = loader.state_dict()
        after_30 = rows(loader, 5)[0]
    with Loader([(dirs["a"], 0.2), (dirs["b"], 0.8)], **kw) as loader:
        loader.load_state_dict(state, mix_change=True)
        at_change = loader.state_dict()
    with Loader([(dirs["a"], 0.5), (dirs["b"], 0.5)], **kw) as loader:
        loader.load_state_dict(at_change, mix_change=True)
        assert loader.state_dict()["phases"] == [[0, [0.7, 0.3]], [30, [0.5, 0.5]]]
    with Loader([(dirs["a"], 0.7), (dirs["b"], 0.3)], **kw) as loader:
        assert loader.load_state_dict(at_change, mix_change=True) == "a=0.2,b=0.8 -> a=0.7,b=0.3"
        assert loader.state_dict()["phases"] == [[0, [0.7, 0.3]]]
        assert torch.equal(rows(loader, 5)[0], after_30)


def test_a_state_from_before_phases_loads(dirs):
    """Version 1 (one number and a fingerprint naming each source's share): one implicit phase."""
    blend, kw = [(dirs["a"], 0.7), (dirs["b"], 0.3)], dict(batch_size=6, seq_len=T, seed=2)
    with Loader(blend, **kw) as loader:
        rows(loader, 7)
        state = loader.state_dict()
        wanted = rows(loader, 20)[0]
        shares = [source.weight for source in loader.sources]
    sources = state["dataset"].removeprefix("blend ").split(", ")
    old = {k: v for k, v in state.items() if k not in ("phases", "sources")}
    old.update(version=1, dataset="blend " + ", ".join(f"{s}={w!r}" for s, w in zip(sources, shares)))
    with Loader(blend, **kw) as loader:
        assert loader.load_state_dict(old) is None
        assert torch.equal(rows(loader, 20)[0], wanted)
    with Loader([(dirs["a"], 0.2), (dirs["b"], 0.8)], **kw) as loader:
        with pytest.raises(ValueError, match=r"different dataset.*before mix phases \(version 1\) resumes only on"):
            loader.load_state_dict(old, mix_change=True)
    with Loader(dirs["a"], **kw) as plain:  # one source: its fingerprint as before
        next(plain)
        one = dict(plain.state_dict(), version=1)
        del one["phases"], one["sources"]
        plain.load_state_dict(one)


@pytest.mark.parametrize("phases", [PHASES[:2], [(0, (0.5, 0.3, 0.2)), (30, (1.0, 0.0, 0.0))]])
def test_windows_per_epoch_with_phases(dirs, phases):
    """The samples until every source read its epoch, each in the phase that draws its last window; the second
    blend drops b and c at sample 30, before they read theirs: a sets it alone."""
    names = list(SIZES)
    windows = []
    for name in names:
        with Loader(dirs[name], batch_size=1, seq_len=T) as alone:
            windows.append(alone.windows_per_epoch)
    _, state = switched(dirs, phases, 10, seq_len=T)
    state["sample"] = phases[-1][0]
    pick = model_phases(phases)
    counts, reached = [0, 0, 0], {}
    for g in range(phases[-1][0] + 2 * BLEND_PERIOD):
        s = pick(g)[0]
        counts[s] += 1
        if counts[s] == windows[s]:
            reached.setdefault(s, g + 1)
    assert len(reached) == (3 if phases == PHASES[:2] else 1)
    with Loader([(dirs[n], w) for n, w in zip(names, phases[-1][1])], batch_size=10, seq_len=T) as loader:
        loader.load_state_dict(state)
        assert loader.windows_per_epoch == max(reached.values())


# ---- mix phases that add sources (load_state_dict(state, mix_change=True) by a loader of more sources)

# A blend that adds c at 1230; a one-source run that becomes a blend with b at 1230, then adds c at 2670.
ADDED = [[(0, (0.6, 0.4)), (1230, (0.3, 0.2, 0.5))],
         [(0, (1.0,)), (1230, (0.5, 0.5)), (2670, (0.2, 0.5, 0.3))]]


def padded(phases):
    """The phases with weight 0 for the sources a phase does not have yet (all three of SIZES)."""
    return [(start, tuple(weights) + (0.0,) * (len(SIZES) - len(weights))) for start, weights in phases]


@pytest.mark.parametrize("mode", ["sequential", "random"])
@pytest.mark.parametrize("phases", ADDED, ids=["blend", "one source"])
def test_an_added_source_starts_at_its_first_sample_and_the_others_go_on(dirs, mode, phases):
    seed, kw = 11, dict(seq_len=T, mode=mode)
    x, state = switched(dirs, phases, 10, seed=seed, threads=2, **kw)
    pick = model_phases(padded(phases))
    source = (x[:, 0] // SPAN).tolist()
    assert source == [pick(g)[0] for g in range(len(x))]
    # Each source's samples in global order are its own stream read alone: the old ones go on where they left off
    # (nothing repeated or skipped), an added one starts at its sample 0.
    assert_each_source_reads_its_own_stream(dirs, x, source, seed, kw)
    for s in range(len(SIZES)):  # (the model says so too: no sample of a source before the phase adding it)
        assert source.index(s) >= next(start for start, weights in phases if len(weights) > s), s
    assert state["phases"] == [[start, list(weights)] for start, weights in padded(phases)]
    assert [name for name, _ in state["sources"]] == list(SIZES) and state["version"] == 3


def test_a_state_saved_after_adding_a_source_resumes_identically(dirs):
    kw = dict(batch_size=10, seq_len=T, seed=4)
    with Loader([(dirs["a"], 0.6), (dirs["b"], 0.4)], **kw) as loader:
        rows(loader, 123)
        state = loader.state_dict()  # sample 1230
    grown = [(dirs["a"], 0.3), (dirs["b"], 0.2), (dirs["c"], 0.5)]
    with Loader(grown, **kw) as loader:
        assert loader.load_state_dict(state, mix_change=True) == "a=0.6,b=0.4 -> a=0.3,b=0.2,c=0.5 (adds c)"
        rows(loader, 30)
        later = loader.state_dict()  # sample 1530, in the phase that added c
        wanted = rows(loader, 40)[0]
    for threads in (1, 3):
        with Loader(grown, threads=threads, **kw) as loader:
            assert loader.load_state_dict(later) is None  # the same sources and mix: no change, no flag needed
            assert torch.equal(rows(loader, 40)[0], wanted)
            assert loader.mix_phases == [(0, {"a": 0.6, "b": 0.4, "c": 0.0}), (1230, {"a": 0.3, "b": 0.2, "c": 0.5})]
    # Adding a source of weight 0 changes no sample: the phase goes on, the change still names it.
    with Loader([(dirs["a"], 0.6), (dirs["b"], 0.4), (dirs["c"], 0.0)], **kw) as loader:
        assert loader.load_state_dict(state, mix_change=True) == "a=0.6,b=0.4 -> a=0.6,b=0.4,c=0 (adds c)"
        assert loader.state_dict()["phases"] == [[0, [0.6, 0.4, 0.0]]]
        resumed = rows(loader, 40)[0]
    with Loader([(dirs["a"], 0.6), (dirs["b"], 0.4)], **kw) as loader:
        loader.load_state_dict(state)
        assert torch.equal(rows(loader, 40)[0], resumed)


def test_adding_sources_is_refused_unless_after_the_states_with_the_opt_in(dirs, tmp_path):
    kw = dict(batch_size=4, seq_len=T)
    a, b, c = dirs["a"], dirs["b"], dirs["c"]
    with Loader([(a, 0.7), (b, 0.3)], **kw) as loader:
        next(loader)
        state = loader.state_dict()
    with Loader(a, **kw) as loader:
        next(loader)
        one = loader.state_dict()
    refused = [
        (state, [(a, 0.7), (b, 0.2), (c, 0.1)], False,
         r"different dataset.*this loader adds c; to add sources from sample 4 on, pass mix_change=True to "
         r"load_state_dict \(the trainer's data.mix_change = true\)"),
        (one, [(a, 0.5), (b, 0.5)], False, r"this loader adds b; .*pass mix_change=True"),
        (state, [(a, 0.7), (c, 0.3)], True, r"this loader lacks the state's source b \[[0-9a-f]{16}\]; a resume "
                                             r"cannot remove a source \(give it weight 0 to stop reading it\)"),
        (state, a, True, r"lacks the state's source b \[.*cannot remove a source"),
        (one, b, True, r"lacks the state's source a \[[0-9a-f]{16}\]; a resume cannot remove"),
        (state, [(a, 0.5), (c, 0.2), (b, 0.3)], True,
         r"the state's sources must stay this loader's first 2, in their order .*any added source after them"),
        (one, [(b, 0.5), (a, 0.5)], True, r"must stay this loader's first 1, in their order"),
    ]
    # The state's source rewritten with other shards (`fmcore prepare --overwrite` into its directory) was
    # "lacks the state's source a; a resume cannot remove a source (give it weight 0 ...)", of a run on one dataset.
    rewritten = _write(tmp_path / "a", 0, [300, 500])
    refused.append((one, rewritten, True, r"source a is other data than the state's \([0-9a-f]{16}, the state's "
                                          r"[0-9a-f]{16}: .*as after a new `fmcore prepare` into its directory\)"))
    for saved, blend, mix_change, match in refused:
        with Loader(blend, **kw) as loader:
            with pytest.raises(ValueError, match=match):
                loader.load_state_dict(saved, mix_change=mix_change)
            assert loader.state_dict()["sample"] == 0 and len(loader.mix_phases) == 1  # nothing changed
    with Loader([(a, 0.7), (b, 0.3)], **kw) as loader:
        for sources in ([], [["a", 5]], "a", [["a"]]):
            with pytest.raises(ValueError, match=r"loader state sources must be \[\[name, fingerprint\], ...\]"):
                loader.load_state_dict(dict(state, dataset="other", sources=sources), mix_change=True)


def test_states_from_before_added_sources(dirs):
    """A one-source state of version 1 or 2 (its dataset is its source's fingerprint) may become a blend; a blend's
    state of version 2 names no source's fingerprint alone: refused, saying to resume it as it was first."""
    kw = dict(batch_size=10, seq_len=T, seed=6)
    a, b, c = dirs["a"], dirs["b"], dirs["c"]
    with Loader(a, **kw) as loader:
        rows(loader, 5)
        v3 = loader.state_dict()
    v2 = {k: v for k, v in v3.items() if k != "sources"} | {"version": 2}
    v1 = {k: v for k, v in v2.items() if k != "phases"} | {"version": 1}
    got = []
    for state in (v3, v2, v1):
        with Loader([(a, 0.5), (b, 0.5)], **kw) as loader:
            assert loader.load_state_dict(state, mix_change=True) == "a=1 -> a=0.5,b=0.5 (adds b)"
            assert loader.state_dict()["phases"] == [[0, [1.0, 0.0]], [50, [0.5, 0.5]]]
            got.append(rows(loader, 20)[0])
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
    with Loader([(a, 0.7), (b, 0.3)], **kw) as loader:
        blend_v2 = {k: v for k, v in loader.state_dict().items() if k != "sources"} | {"version": 2}
    with Loader([(a, 0.7), (b, 0.3), (c, 0.1)], **kw) as loader:
        with pytest.raises(ValueError, match=r"different dataset.*before sources could be added \(version 2\) resumes "
                                             r"only on its own sources: resume it so and save, then add sources"):
            loader.load_state_dict(blend_v2, mix_change=True)
        with pytest.raises(ValueError, match=r"different dataset.*with mix_change=True a resume may change a mix's "
                                             r"weights and add sources"):
            loader.load_state_dict(blend_v2)
    with Loader([(a, 0.7), (b, 0.3)], **kw) as loader:
        assert loader.load_state_dict(blend_v2) is None  # on its own sources, as before
