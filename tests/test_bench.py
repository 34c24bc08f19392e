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
