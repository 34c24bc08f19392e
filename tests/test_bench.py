"""The benchmark harness itself: rows, table, JSON, plots, the CLI and `fmcore info`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmcore.bench import BENCHMARKS, BenchContext, load, report
from fmcore.bench.report import Row
from fmcore.bench.roofline import Roofline
from fmcore.bench.timing import peak_memory_mib, time_ms

ROOT = Path(__file__).resolve().parent.parent


def test_markdown_one_column_per_system_and_metric():
    rows = [Row("rope", "c1", "fmcore", "ms", 1.5, "ms"), Row("rope", "c1", "torch-eager", "ms", 3.0, "ms"),
            Row("rope", "c2", "fmcore", "ms", 2.0, "ms")]
    table = report.markdown(rows)
    assert "| case | fmcore ms | torch-eager ms |" in table
    assert "| c2 | 2 | - |" in table  # a missing peer shows as '-', never as a number
    # The README's form: a column per system, a line per (case, metric) that has a value.
    rows.append(Row("rope", "c1", "fmcore", "MiB", 4.0, "MiB"))
    table = report.markdown(rows, by_metric=True)
    assert "| case | metric | fmcore | torch-eager |" in table
    assert "| c1 | MiB | 4 | - |" in table and "| c2 | ms | 2 | - |" in table and "| c2 | MiB" not in table
    assert "### rope (ms)" in report.markdown(rows[:3], by_metric=True)  # one metric: named in the title


def test_bench_tiles_follow_the_environment(monkeypatch):
    from fmcore._C import attention_tile_configs
    from fmcore.bench import bench_tiles

    monkeypatch.delenv("FMCORE_BENCH_TILES", raising=False)
    assert bench_tiles() == list(range(1, attention_tile_configs))
    monkeypatch.setenv("FMCORE_BENCH_TILES", "3,5")
    assert bench_tiles() == [3, 5]
    monkeypatch.setenv("FMCORE_BENCH_TILES", "")  # none passed: none timed
    assert bench_tiles() == []
    monkeypatch.setenv("FMCORE_BENCH_TILES", f"2,{attention_tile_configs}")
    with pytest.raises(ValueError, match="FMCORE_BENCH_TILES"):
        bench_tiles()


def test_json_round_trip_and_plot(tmp_path):
    rows = [Row("rope", "c1", "fmcore", "ms", 1.0, "ms"), Row("rope", "c1", "fmcore", "roofline%", 50.0, "% of copy")]
    head = report.header(torch.device("cpu"), Roofline(copy_gbps=10.0, matmul_tflops=0.1))
    report.write_json(tmp_path / "r.json", head, rows)
    head2, rows2 = report.load_json(tmp_path / "r.json")
    assert rows2 == rows and head2["copy_gbps"] == 10.0 and head2["date"]
    paths = report.plot(rows, tmp_path / "plots")
    assert [p.name for p in paths] == ["rope.png"] and paths[0].stat().st_size > 1000
    # A bench with neither ms nor roofline% (the loader reports tok/s) still gets its plot.
    paths = report.plot([Row("loader", "c1", "fmcore", "tok/s", 1e9, "tok/s")], tmp_path / "plots")
    assert [p.name for p in paths] == ["loader.png"] and paths[0].stat().st_size > 1000


def test_merge_keeps_every_runs_header_and_the_last_rows_per_bench(tmp_path):
    head = report.header(torch.device("cpu"), Roofline(copy_gbps=10.0, matmul_tflops=0.1))
    report.write_json(tmp_path / "a.json", head, [Row("rope", "c", "fmcore", "ms", 1.0, "ms"),
                                                  Row("adamw", "c", "fmcore", "ms", 2.0, "ms")])
    report.write_json(tmp_path / "b.json", {**head, "copy_gbps": 11.0}, [Row("adamw", "c", "fmcore", "ms", 3.0, "ms")])
    merged_head, rows = report.merge([tmp_path / "a.json", tmp_path / "b.json"])
    assert [h["copy_gbps"] for h in merged_head["runs"]] == [10.0, 11.0]
    assert sorted((r.bench, r.value) for r in rows) == [("adamw", 3.0), ("rope", 1.0)]
    report.write_json(tmp_path / "c.json", {**head, "device": "another GPU"}, [])
    try:
        report.merge([tmp_path / "a.json", tmp_path / "c.json"])
    except ValueError as e:
        assert "different devices" in str(e)
    else:
        raise AssertionError("merging results of two devices must fail")


def test_timing_is_median_of_real_work():
    x = torch.randn(256, 256)
    fast = time_ms(lambda: x + 1, torch.device("cpu"), warmup=1, rep=5)
    slow = time_ms(lambda: x @ x @ x @ x, torch.device("cpu"), warmup=1, rep=5)
    assert 0 < fast and 0 < slow
    assert peak_memory_mib(lambda: x + 1, torch.device("cpu")) is None


def test_unknown_benchmark_is_an_error():
    try:
        load("no-such-bench")
    except ValueError as e:
        assert "no-such-bench" in str(e) and "rope" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_cli_unknown_benchmark_exits_2_before_measuring(capsys):
    from fmcore.bench.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["rope", "no-such-bench"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "unknown benchmark 'no-such-bench'" in captured.err and "roofline" not in captured.out



def test_cli_unwritable_outputs_exit_2_before_measuring(tmp_path, capsys):
    # A --plot (or --json) path under a file raised FileExistsError after every benchmark had run.
    from fmcore.bench.__main__ import main

    (tmp_path / "afile").write_text("")
    for args, message in ((["--plot", tmp_path / "afile"], f"--plot: cannot make {tmp_path / 'afile'}: File exists"),
                          (["--json", tmp_path / "afile" / "r.json"], f"--json: cannot make {tmp_path / 'afile'}"),
                          (["--json", tmp_path], f"--json {tmp_path} is a directory")):
        with pytest.raises(SystemExit) as e:
            main(["rope", *map(str, args)])
        captured = capsys.readouterr()
        assert e.value.code == 2 and message in captured.err and "roofline" not in captured.out

@pytest.mark.parametrize("device, message", [("foo", "expected cpu or cuda"), ("mps", "expected cpu or cuda"),
                                             ("cuda:99", "CUDA device(s)")])
def test_cli_bad_device_exits_2(capsys, device, message):
    from fmcore.bench.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["rope", "--device", device])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_every_registered_benchmark_imports():
    for name in BENCHMARKS:
        assert callable(load(name).run)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(BENCHMARKS) - {"rope"}))  # rope: the CLI test below
def test_every_benchmark_runs_quick_on_cpu(name):
    # Each benchmark's code path (not its numbers) on small shapes, so that a slip in one is found
    # here rather than in the few minutes of GPU time the benchmarks get. The CUDA-only systems
    # (SDPA backends, Liger, ...) still run only on the GPU.
    ctx = BenchContext(device=torch.device("cpu"), roofline=Roofline(copy_gbps=10.0, matmul_tflops=0.05), quick=True)
    rows = list(load(name).run(ctx))
    assert rows and {r.bench for r in rows} == {name}
    assert all(r.value > 0 for r in rows if isinstance(r.value, (int, float)))
    assert any(r.system == "fmcore" for r in rows)


def test_cli_runs_rope_on_cpu_and_writes_json(tmp_path):
    out = tmp_path / "rope.json"
    proc = subprocess.run([sys.executable, "-m", "fmcore.bench", "rope", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "### rope" in proc.stdout
    data = json.loads(out.read_text())
    systems = {r["system"] for r in data["rows"]}
    assert {"fmcore", "torch-eager", "torch-compile"} <= systems
    assert all(r["value"] > 0 for r in data["rows"])


def test_fmcore_info_cli():
    proc = subprocess.run([sys.executable, "-m", "fmcore", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch_running" in proc.stdout and "rope" in proc.stdout
    assert "kernels_run_here: " in proc.stdout


def test_readme_performance_section_is_generated():
    # The README's numbers come only from committed results through scripts/render_readme.py.
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/render_readme.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["profile_kernels.py", "sanitize_ops.py"])
def test_gpu_check_scripts_run_on_cpu(script, tmp_path):
    # scripts/gpu_check.sh runs these on the GPU, where a slip costs part of a 15-minute lease: prove
    # them here on the CPU first (small shapes; the same code paths).
    env = {**os.environ, "FMCORE_SANITIZE_DEVICE": "cpu"}
    args = ["--device", "cpu", "--json", str(tmp_path / "k.json")] if script == "profile_kernels.py" else []
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    if script == "profile_kernels.py":
        ops = json.loads((tmp_path / "k.json").read_text())["ops"]
        assert set(ops) >= {"attention", "rope", "cross_entropy", "linear_cross_entropy", "adamw"}
        assert all(op["kernels"] and op["total_us"] > 0 for op in ops.values())


def test_check_bars_verdicts(tmp_path):
    # Met, not met and not measured, from rows shaped as the benchmarks write them.
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_bars
    finally:
        sys.path.pop(0)
    rope = "q(8,2048,32,128) k(8,2048,8,128) bfloat16 fwd"
    att = "B8 H16 S1024 D128 causal bf16 fwd"
    rows = [Row("rope", rope, "fmcore", "roofline%", 90.0, "%"), Row("rope", rope, "fmcore", "ms", 0.100, "ms"),
            Row("rope", rope, "torch-compile", "ms", 0.118, "ms"),
            Row("cross_entropy", "logits (16384, 50304) bfloat16", "fmcore", "ms", 2.5, "ms"),
            Row("attention", att, "fmcore", "TFLOP/s", 200.0, "TFLOP/s"),
            Row("attention", att, "sdpa-flash", "TFLOP/s", 194.0, "TFLOP/s"),
            Row("attention", att, "sdpa-cudnn", "TFLOP/s", 400.0, "TFLOP/s"),
            Row("attention", att, "fmcore-tiles1", "TFLOP/s", 250.0, "TFLOP/s"),
            Row("attention", att, "fmcore-tiles12", "TFLOP/s", 240.0, "TFLOP/s")]
    tiny = "per-call overhead q(1,1,1,64) "
    rows += [Row("rope", tiny + "fwd no-grad", "fmcore", "ms", 0.019, "ms/call"),
             Row("rope", tiny + "one op (neg) no-grad", "torch-eager", "ms", 0.016, "ms/call")]
    train = "gpt2-124m B16 T1024 bf16"
    rows += [Row("train", train, s, "tok/s", v, "tok/s")
             for s, v in (("fmcore", 366e3), ("torch-compile", 472e3), ("fmcore-tiles3", 350e3), ("fmcore-tiles4", 480e3),
                          ("fmcore-tiles5", 470e3), ("fmcore-bf16", 400e3))]
    got = {(b["issue"], b["bar"], b["case"]): b for b in check_bars.bars(rows)}
    assert got[(2, ">= 85% of copy bandwidth", "rope fwd")]["verdict"] == "met"
    assert got[(2, "as fast as torch.compile (peer)", "rope fwd")]["verdict"] == "met"
    assert got[(2, ">= 85% of copy bandwidth", "rope bwd")]["verdict"] == "not measured"
    o = got[(2, "aim: < 15 us Python overhead per call", "apply_rotary, tiny")]
    assert o["verdict"] == "NOT met" and o["note"] == "one torch op (neg): 16 us"
    assert got[(3, "<= 2.0 ms in place", "CE (16384, 50304) bf16")]["verdict"] == "NOT met"
    a = got[(5, ">= SDPA flash (FA2) (peer)", f"attention {att}")]
    assert a["verdict"] == "met" and a["note"] == "0.50x cuDNN; tiles=1: 250"
    t = got[(7, "eager >= torch.compile (peer)", "train 124M fmcore")]
    assert t["verdict"] == "NOT met" and t["note"] == "0.78x; tiles=4: 480; bf16 weights: 400"
    assert got[(7, "compiled >= 1.25x torch.compile (peer)", "train 124M fmcore-compile")]["verdict"] == "not measured"
    assert {b["verdict"] for (issue, _, _), b in got.items() if issue in (4, 6)} == {"not measured"}
    head = report.header(torch.device("cpu"), Roofline(10.0, 0.1))
    for device, shown in (("NVIDIA H100 80GB HBM3", "| 5 | >= SDPA flash (FA2) (peer) |"), (head["device"], "none is judged")):
        report.write_json(tmp_path / "r.json", {**head, "device": device}, rows)
        proc = subprocess.run([sys.executable, str(ROOT / "scripts/check_bars.py"), str(tmp_path / "r.json")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and shown in proc.stdout, proc.stdout + proc.stderr


# ---- the fixes of the bench hunt: partial runs, failed peers, compile and input hygiene, merge, README

CPU_CTX = dict(device=torch.device("cpu"), roofline=Roofline(copy_gbps=10.0, matmul_tflops=0.05), quick=True)


def _fast_roofline(monkeypatch):
    from fmcore.bench import roofline

    monkeypatch.setattr(roofline, "measure", lambda device: Roofline(copy_gbps=10.0, matmul_tflops=0.05))


def test_interrupted_run_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    # gpu_check.sh's time caps stop a stage with SIGINT (KeyboardInterrupt) mid-benchmark: the rows
    # measured before it must already be in the JSON. Here norm's first peer is "interrupted".
    import fmcore.bench.norm as norm
    from fmcore.bench.__main__ import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    _fast_roofline(monkeypatch)
    monkeypatch.setattr(norm, "torch_add_norm", interrupted)
    out = tmp_path / "norm.json"
    with pytest.raises(KeyboardInterrupt):
        main(["norm", "--quick", "--json", str(out)])
    head, rows = report.load_json(out)
    assert rows and {(r.bench, r.system) for r in rows} == {("norm", "fmcore")}
    assert head["skipped"] == []


def test_failing_rope_peer_is_skipped_and_recorded(tmp_path, monkeypatch, capsys):
    # A peer that raises (here torch-eager's and torch-compile's function) costs its rows only, is
    # named on stdout, and is listed in the JSON header's "skipped"; fmcore's rows and the later
    # benchmarks still come.
    import fmcore.bench.rope as rope
    from fmcore.bench.__main__ import main

    def broken(*args, **kwargs):
        raise RuntimeError("simulated peer failure")

    _fast_roofline(monkeypatch)
    monkeypatch.setattr(rope, "hf_rope", broken)
    monkeypatch.setattr(rope, "call_overhead_us", lambda device, **kw: {})  # host timing: not the point here
    out = tmp_path / "rope.json"
    assert main(["rope", "--quick", "--json", str(out)]) == 0
    head, rows = report.load_json(out)
    assert {r.system for r in rows} == {"fmcore"}
    assert {(s["bench"], s["system"]) for s in head["skipped"]} == {("rope", "torch-eager"), ("rope", "torch-compile")}
    assert all("simulated peer failure" in s["error"] or s["system"] == "torch-compile" for s in head["skipped"])
    printed = capsys.readouterr().out
    assert "rope: torch-eager skipped on" in printed and "| failed |" in printed


def test_adamw_fmcore_failure_raises_and_peer_failure_is_skipped(monkeypatch):
    import fmcore.bench.adamw as adamw
    from fmcore.bench import SKIPPED

    class Broken:
        def __init__(self, *args, **kwargs):
            raise ValueError("simulated fmcore regression")

    ctx = BenchContext(**CPU_CTX)
    monkeypatch.setattr(adamw, "FusedAdamW", Broken)
    with pytest.raises(ValueError, match="simulated fmcore regression"):
        list(adamw.run(ctx))  # fmcore's own failure is never a silent skip
    monkeypatch.undo()
    monkeypatch.setattr(torch.optim, "AdamW", Broken)  # every torch peer now fails at construction
    SKIPPED.clear()
    monkeypatch.setattr(adamw, "time_ms", lambda *args, **kwargs: 1.0)  # the path, not the timing
    rows = list(adamw.run(ctx))
    assert {r.system for r in rows} == {"fmcore"}
    assert {s["system"] for s in SKIPPED} == {"torch-fused", "torch-foreach"}
    SKIPPED.clear()


def test_try_import_names_a_broken_peer(tmp_path, monkeypatch, capsys):
    from fmcore.bench import try_import

    (tmp_path / "peer_broken_xyz.py").write_text("raise ImportError('needs a newer triton')\n")
    (tmp_path / "peer_missing_dep_xyz.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert try_import("no_such_peer_xyz.ops") is None
    assert capsys.readouterr().out == ""  # not installed: quietly absent
    assert try_import("peer_broken_xyz") is None
    assert "peer peer_broken_xyz failed to import: ImportError: needs a newer triton" in capsys.readouterr().out
    assert try_import("peer_missing_dep_xyz") is None  # installed, but a dependency is missing
    assert "peer_missing_dep_xyz failed to import: ModuleNotFoundError" in capsys.readouterr().out


def test_markdown_shows_a_failed_peer_apart_from_not_applicable():
    rows = [Row("rope", "c fwd", "fmcore", "ms", 1.0, "ms"), Row("rope", "c bwd", "fmcore", "ms", 2.0, "ms"),
            Row("rope", "d", "fmcore", "ms", 3.0, "ms")]
    failed = [{"bench": "rope", "case": "c", "system": "liger", "error": "RuntimeError: x"},
              {"bench": "norm", "case": "c", "system": "torch-eager", "error": "RuntimeError: x"}]
    table = report.markdown(rows, by_metric=True, failed=failed)
    assert "| case | fmcore | liger |" in table  # a peer with no rows at all still gets its column
    assert "| c fwd | 1 | failed |" in table and "| c bwd | 2 | failed |" in table and "| d | 3 | - |" in table
    assert "failed: the peer raised" in table
    wide = report.markdown(rows, failed=failed)
    assert "| case | fmcore ms | liger ms |" in wide and "| c fwd | 1 | failed |" in wide
    assert "failed" not in report.markdown(rows)


@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
def test_compile_peer_is_reset_per_case(name, monkeypatch):
    # Without torch._dynamo.reset() per case, the second case's torch-compile peer recompiles with
    # dynamic shapes (automatic dynamic): each case's must be a static-shape compile, as in norm/gelu/swiglu.
    module = load(name)
    events = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))
    if name == "cross_entropy":
        monkeypatch.setattr(module, "_measure", lambda bench, case, *a: events.append(case.split(" out")[0]) or [])
        cases = 2
    else:
        monkeypatch.setattr(module, "_measure", lambda ctx, case, *a: events.append(case) or [])
        cases = 1  # the quick shapes have one case: the reset still precedes it
    list(module.run(BenchContext(**CPU_CTX)))
    firsts = [i for i, e in enumerate(events) if e != "reset" and e not in events[:i]]
    assert len(firsts) == cases and all(i > 0 and events[i - 1] == "reset" for i in firsts), events


def test_cross_entropy_times_every_call_on_the_original_logits():
    # fmcore's inplace_backward (and Liger) write the gradient over the logits: each timed call must
    # still see the same N(0, 1) logits the torch peers see, restored outside the timing.
    from fmcore.bench import cross_entropy as ce
    from fmcore.ops import cross_entropy

    seen = []

    def fn(x, t):
        seen.append(x.detach().clone())
        return cross_entropy(x, t, inplace_backward=True)

    def make_inputs():
        return torch.randn(16, 100, requires_grad=True), torch.randint(0, 100, (16,))

    ctx = BenchContext(**CPU_CTX)
    rows = ce._measure("cross_entropy", "c", "fmcore", fn, make_inputs, 2 * 16 * 100 * 4, ctx)
    assert rows and len(seen) > 5
    assert all(torch.equal(s, seen[0]) for s in seen)


def test_time_ms_runs_setup_before_every_call():
    calls = []
    time_ms(lambda: calls.append("fn"), torch.device("cpu"), warmup=2, rep=3, setup=lambda: calls.append("setup"))
    assert calls == ["setup", "fn"] * 5


def test_plot_draws_no_bar_for_a_missing_system(tmp_path, monkeypatch):
    import matplotlib.axes

    heights = {}
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, label=None, **kwargs):
        heights[(self.get_title(), label)] = list(height)
        return real_bar(self, x, height, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    rows = [Row("rope", "c1", "fmcore", "ms", 1.0, "ms"), Row("rope", "c1", "liger", "ms", 2.0, "ms"),
            Row("rope", "c2", "fmcore", "ms", 3.0, "ms")]  # liger failed (or is absent) on c2
    report.plot(rows, tmp_path)
    assert heights[("", "fmcore")] == [1.0, 3.0] and heights[("", "liger")] == [2.0]  # no 0 ms bar


def _head(**kw):
    return {"date": "2026-12-04", "device": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0",
            "fmcore_commit": "abc1234", "copy_gbps": 4222.0, "matmul_tflops": 787.0, **kw}


def test_merge_replaces_per_case_and_system(tmp_path):
    # A later run cut short (one system of train) replaces that system's rows only, not the bench's.
    train = "gpt2-124m B16 T1024 bf16"
    report.write_json(tmp_path / "a.json", _head(skipped=[{"bench": "rope", "case": "c", "system": "liger",
                                                           "error": "E"}]),
                      [Row("train", train, s, "tok/s", v, "tok/s") for s, v in (("fmcore", 1.0), ("torch-eager", 2.0))]
                      + [Row("rope", "c fwd", "fmcore", "ms", 1.0, "ms")])
    report.write_json(tmp_path / "b.json", _head(date="2026-12-05", skipped=[{"bench": "adamw", "case": "c",
                                                                            "system": "torch-fused", "error": "E"}]),
                      [Row("train", train, "fmcore", "tok/s", 3.0, "tok/s"),
                       Row("rope", "c fwd", "liger", "ms", 0.5, "ms")])
    head, rows = report.merge([tmp_path / "a.json", tmp_path / "b.json"])
    assert sorted((r.bench, r.system, r.value) for r in rows) == [
        ("rope", "fmcore", 1.0), ("rope", "liger", 0.5), ("train", "fmcore", 3.0), ("train", "torch-eager", 2.0)]
    assert head["date"] == "2026-12-05" and len(head["runs"]) == 2
    # liger's skip in a.json is gone: b.json measured it
    assert [(s["bench"], s["system"]) for s in head["skipped"]] == [("adamw", "torch-fused")]


@pytest.mark.parametrize("field, value, what", [("torch", "2.12.0+cu130", "torch versions"),
                                                ("cuda", "12.8", "CUDA versions"),
                                                ("device", "NVIDIA H100 80GB HBM3", "devices")])
def test_merge_refuses_different_software_or_gpu(tmp_path, field, value, what):
    report.write_json(tmp_path / "a.json", _head(), [Row("rope", "c", "fmcore", "ms", 1.0, "ms")])
    report.write_json(tmp_path / "b.json", _head(**{field: value}), [Row("rope", "c", "fmcore", "ms", 2.0, "ms")])
    with pytest.raises(ValueError, match=f"different {what} cannot be merged"):
        report.merge([tmp_path / "a.json", tmp_path / "b.json"])


def test_header_names_the_fmcore_commit(tmp_path, monkeypatch):
    import re

    monkeypatch.delenv("FMCORE_COMMIT", raising=False)
    head = report.header(torch.device("cpu"), Roofline(copy_gbps=10.0, matmul_tflops=0.1))
    assert "fmcore_commit" in head
    commit = head["fmcore_commit"]
    # The imported fmcore, not the tests' tree: CI runs these tests against an installed wheel.
    if (Path(report.__file__).resolve().parents[3] / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", commit), commit
    # Not a git checkout (an installed or copied tree): None, not an error or another repository's hash.
    fake = tmp_path / "copy" / "python" / "fmcore" / "bench"
    fake.mkdir(parents=True)
    monkeypatch.setattr(report, "__file__", str(fake / "report.py"))
    assert report.git_commit() is None
    # ... unless FMCORE_COMMIT names it (the GPU machine's tree copy has no .git)
    monkeypatch.setenv("FMCORE_COMMIT", "abc1234")
    assert report.git_commit() == "abc1234"


def _render_readme():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import render_readme
    finally:
        sys.path.pop(0)
    return render_readme


def test_readme_renders_each_bench_from_its_newest_file(tmp_path):
    # A later session that ran only rope must not wipe the other benchmarks' tables.
    render_readme = _render_readme()
    train = "gpt2-124m B16 T1024 bf16"
    report.write_json(tmp_path / "h200-2026-12-04.json", _head(),
                      [Row("rope", "c fwd", "fmcore", "ms", 1.0, "ms"),
                       Row("train", train, "fmcore", "tok/s", 5.0, "tok/s"),
                       Row("loader", "random", "fmcore", "tok/s", 6.0, "tok/s")])
    skipped = [{"bench": "rope", "case": "c", "system": "liger", "error": "E"}]
    report.write_json(tmp_path / "h200-2026-12-09.json", _head(date="2026-12-09", skipped=skipped),
                      [Row("rope", "c fwd", "fmcore", "ms", 0.9, "ms")])
    text = render_readme.render(tmp_path)
    assert text.startswith("From `h200-2026-12-09.json`: NVIDIA H200, 2026-12-09")
    rope = text[text.index("### rope"):text.index("### train")]
    assert "| c fwd | 0.9 | failed |" in rope and "From `" not in rope
    train_table = text[text.index("### train"):text.index("### loader")]
    assert "From `h200-2026-12-04.json`: NVIDIA H200, 2026-12-04" in train_table and "| 5 |" in train_table
    assert "Host timing" in train_table and "max_memory_allocated" in train_table
    assert "Host timing" in text[text.index("### loader"):]


def test_readme_orders_same_date_files_by_name_not_listing(tmp_path, monkeypatch):
    # Two GPUs' files of one date: the README must not depend on the directory's listing order.
    render_readme = _render_readme()
    for gpu, ms in (("h100", 2.0), ("h200", 1.0)):
        report.write_json(tmp_path / f"{gpu}-2026-12-09.json", _head(device=gpu.upper(), date="2026-12-09"),
                          [Row("rope", "c fwd", "fmcore", "ms", ms, "ms")])
    listed = sorted(tmp_path.glob("*.json"))
    for order in (listed, listed[::-1]):
        monkeypatch.setattr(Path, "glob", lambda self, pattern, order=order: iter(order))
        assert render_readme.render(tmp_path).startswith("From `h200-2026-12-09.json`: H200")


def test_readme_shows_masked_attention_in_ms_and_tflops_with_its_note(tmp_path):
    # Its full-causal reference does other work than the masked systems: the README keeps the ms beside
    # the TFLOP/s, and says so.
    render_readme = _render_readme()
    rows = [Row("attention_masked", "c fwd", s, m, v, m) for s in ("fmcore", "sdpa-flash-full-causal")
            for m, v in (("ms", 1.0), ("TFLOP/s", 300.0), ("roofline%", 40.0))]
    report.write_json(tmp_path / "h200-2026-12-09.json", _head(), rows)
    table = render_readme.render(tmp_path).split("### attention_masked", 1)[1].split("###", 1)[0]
    assert "| c fwd | ms | 1 | 1 |" in table and "| c fwd | TFLOP/s | 300 | 300 |" in table
    assert "roofline%" not in table and "without that mask" in table


def test_train_bench_records_a_failed_system_and_goes_on(monkeypatch, capsys):
    import fmcore.bench.train as train_bench
    from fmcore.bench import SKIPPED

    real = train_bench._measure

    def measure(mcfg, system, *args, **kwargs):
        if system == "fmcore":
            raise RuntimeError("simulated kernel failure\nsecond line")
        return real(mcfg, system, *args, **kwargs)

    monkeypatch.setattr(train_bench, "_measure", measure)
    SKIPPED.clear()
    rows = list(train_bench.run(BenchContext(**CPU_CTX)))
    assert "fmcore" not in {r.system for r in rows} and "torch-eager" in {r.system for r in rows}
    assert SKIPPED == [{"bench": "train", "case": "tiny-2L B4 T128 fp32", "system": "fmcore",
                        "error": "RuntimeError: simulated kernel failure"}]
    captured = capsys.readouterr()
    assert "train: fmcore skipped on tiny-2L B4 T128 fp32: RuntimeError: simulated kernel failure" in captured.out
    assert "second line" in captured.err  # fmcore's own failure: the whole traceback, to debug it
    SKIPPED.clear()


def test_train_bench_step_time_is_the_median(monkeypatch):
    import fmcore.bench.train as train_bench

    clock = iter([0.0, 1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 10.0])  # steps of 1, 2, 3 and 10 s
    monkeypatch.setattr(train_bench, "make_step", lambda *args: (lambda: None, "cfg"))
    monkeypatch.setattr(train_bench.time, "perf_counter", lambda: next(clock))
    sec, _, _ = train_bench._measure(None, "fmcore", 1, 1, "fp32", torch.device("cpu"), steps=4, warmup=0)
    assert sec == 2.5  # not the upper middle value, 3


def test_fmcore_cli_names_its_commands(capsys):
    from fmcore.__main__ import main

    for argv, status, said in (([], 2, "the following arguments are required: command"),
                               (["nope"], 2, "invalid choice: 'nope'"), (["-h"], 0, "plan-memory: per-GPU memory")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        out, err = capsys.readouterr()
        assert e.value.code == status and said in out + err, argv
    assert main(["plan-memory", "tiny"]) == 0
    assert "tiny: gpt2 " in capsys.readouterr().out


def test_fmcore_bench_draws_its_charts(tmp_path, monkeypatch, capsys):
    import fmcore.bench.rope as rope
    from fmcore.__main__ import main

    _fast_roofline(monkeypatch)
    monkeypatch.setattr(rope, "hf_rope", lambda *a, **k: 1 / 0)  # the peers fail: fmcore's rows alone, quickly
    monkeypatch.setattr(rope, "call_overhead_us", lambda device, **kw: {})
    assert main(["bench", "rope", "--quick", "--plot", str(tmp_path / "charts")]) == 0
    charts = sorted(p.name for p in (tmp_path / "charts").iterdir())
    assert charts and all(name.endswith(".png") for name in charts)
    assert f"# wrote {tmp_path / 'charts' / charts[0]}" in capsys.readouterr().out


# ---- attention_masked: sliding-window and document-masked attention against their peers

def _brute_pairs(lengths, left):
    """Every (query, key) pair of a dense (T, T) mask: same document, key not after the query, and
    within left keys before it (left -1: no bound)."""
    starts = [sum(lengths[:d]) for d in range(len(lengths))]
    doc = [d for d, n in enumerate(lengths) for _ in range(n)]
    T = sum(lengths)
    return sum(1 for i in range(T) for j in range(T)
               if doc[i] == doc[j] and starts[doc[i]] <= j <= i and (left < 0 or i - j <= left))


@pytest.mark.parametrize("lengths, left", [([37], -1), ([37], 0), ([37], 5), ([37], 36), ([37], 100),
                                           ([5, 1, 17, 9], -1), ([5, 1, 17, 9], 3), ([64, 64], 15)])
def test_masked_attention_counts_exactly_the_admitted_pairs(lengths, left):
    from fmcore.bench.attention_masked import admitted_pairs, dense_mask

    assert admitted_pairs(lengths, left) == _brute_pairs(lengths, left)
    assert int(dense_mask(lengths, left).sum()) == _brute_pairs(lengths, left)


def test_masked_attention_document_lengths_are_seeded_and_fill_the_total():
    from fmcore.bench.attention_masked import document_lengths

    lengths = document_lengths(16384, 32, 8192)
    assert sum(lengths) == 16384 and lengths == document_lengths(16384, 32, 8192)  # the same case every run
    assert all(n >= 1 for n in lengths) and max(lengths) <= 8192 and len(lengths) > 2
    assert min(lengths[:-1]) >= 32  # only the last, cut to fit the total, may be shorter
    assert min(lengths) < 512 and max(lengths) > 2048  # short and long documents both


def test_masked_attention_runs_quick_on_cpu_with_exact_flops():
    from fmcore.bench import SKIPPED
    from fmcore.bench import attention_masked as am

    SKIPPED.clear()
    rows = list(am.run(BenchContext(**CPU_CTX)))
    assert SKIPPED == [] and {r.bench for r in rows} == {"attention_masked"}
    cases = list(dict.fromkeys(r.case.rsplit(" ", 1)[0] for r in rows))
    assert len(cases) == 2 and "window (63, 0)" in cases[0] and "docs" in cases[1]
    # On the CPU: FlexAttention eager and forward only (torch has no CPU backward for it).
    for case in cases:
        got = {(r.system, r.case.rsplit(" ", 1)[1]) for r in rows if r.case.startswith(case)}
        assert got == {("fmcore", "fwd"), ("fmcore", "bwd"), ("torch-flex", "fwd"),
                       ("torch-eager-full-causal", "fwd"), ("torch-eager-full-causal", "bwd")}, got
    assert all(r.value > 0 for r in rows)

    def flops(case, system, phase):
        ms, = (r.value for r in rows if (r.case, r.system, r.metric) == (f"{case} {phase}", system, "ms"))
        tflops, = (r.value for r in rows if (r.case, r.system, r.metric) == (f"{case} {phase}", system, "TFLOP/s"))
        return tflops * 1e12 * ms * 1e-3

    # The windowed and document-masked systems are credited the pairs their mask admits, the full-causal
    # reference its own: B H S (S + 1) / 2 pairs.
    window = 1 * 2 * (64 * 65 // 2 + (256 - 64) * 64)  # B1 H2 S256, left 63: 64 keys a query at most
    assert flops(cases[0], "fmcore", "fwd") == pytest.approx(4 * 32 * window)
    assert flops(cases[0], "torch-flex", "fwd") == pytest.approx(4 * 32 * window)
    assert flops(cases[0], "fmcore", "bwd") == pytest.approx(2.5 * 4 * 32 * window)
    assert flops(cases[0], "torch-eager-full-causal", "fwd") == pytest.approx(4 * 32 * 2 * 256 * 257 / 2)
    lengths = am.document_lengths(*am.QUICK_DOC_CASES[0][:3])
    docs = 2 * sum(n * (n + 1) // 2 for n in lengths)
    assert flops(cases[1], "fmcore", "fwd") == pytest.approx(4 * 32 * docs)
    assert flops(cases[1], "torch-flex", "fwd") == pytest.approx(4 * 32 * docs)


@pytest.mark.parametrize("wrong", ["window", "documents"])
def test_masked_attention_disagreeing_system_raises(monkeypatch, wrong):
    # A peer computing another mask is a benchmark bug (its numbers would be for other work): the quick
    # run's agreement check raises, and measure_system does not turn that into a skipped peer. Each
    # wrong system here is right on the other case, so the check must catch it on its own case.
    from fmcore.bench import attention_masked as am

    real = am._systems

    def with_a_wrong_one(device, case, *args):
        fmcore = real(device, case, *args)[0].fn
        if wrong == "window" and case.left >= 0:  # one key too many a query
            fn = lambda q, k, v: am.flash_attention(q, k, v, causal=True, window_size=(case.left + 1, 0))  # noqa: E731
        elif wrong == "documents" and len(case.lengths) > 1:  # the documents' boundaries ignored
            fn = lambda q, k, v: am.flash_attention(q, k, v, causal=True)  # noqa: E731
        else:
            fn = fmcore
        return [*real(device, case, *args), am.System("wrong", fn)]

    monkeypatch.setattr(am, "_systems", with_a_wrong_one)
    monkeypatch.setattr(am, "time_ms", lambda *a, **k: 1.0)  # the check, not the timing
    seen = []
    with pytest.raises(am.Disagreement, match="wrong disagrees with the float64 dense-mask reference"):
        for row in am.run(BenchContext(**CPU_CTX)):
            seen.append(row)
    # documents: the window case ran whole, the wrong system's rows included
    assert any(r.system == "wrong" for r in seen) == (wrong == "documents")


def test_gpu_check_all_runs_every_benchmark():
    # `scripts/gpu_check.sh all` must reach each registered benchmark (bench-NAME, or bench-ops' group).
    script = (ROOT / "scripts/gpu_check.sh").read_text()
    everything = script[script.index('[ "${stages[*]}" = all ]'):].split("\n", 2)[:2]
    stages = " ".join(everything).split("stages=(", 1)[1].split(")", 1)[0].split()
    ops = script.split("bench bench-ops", 1)[1].split("\n", 1)[0].split()[1:]
    reached = {s.removeprefix("bench-") for s in stages if s.startswith("bench-")} | set(ops)
    assert set(BENCHMARKS) <= reached, set(BENCHMARKS) - reached


def test_masked_attention_quick_in_bf16_is_not_held_to_fp32_rounding(monkeypatch):
    # `--quick` on the GPU runs the small shapes in bf16, whose rounding (~1e-2 here) the float64 check's
    # fp32 tolerance (1e-4) would report as a disagreement of fmcore itself, ending the run.
    from fmcore.bench import attention_masked as am

    monkeypatch.setattr(am, "_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(am, "time_ms", lambda *a, **k: 1.0)  # the check, not the timing
    rows = list(am.run(BenchContext(**CPU_CTX)))
    assert {r.case.rsplit(" ", 2)[1] for r in rows} == {"bf16"}
    assert {r.system for r in rows} >= {"fmcore", "torch-flex"}
