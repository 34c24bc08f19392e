"""Regenerate README.md's performance section from the committed GPU results.

    python scripts/render_readme.py          # rewrite README.md in place
    python scripts/render_readme.py --check  # exit 1 if README.md is stale (used by the tests)

Results files are benchmarks/results/<gpu>-<yyyy-mm-dd>.json as written by `python -m fmcore.bench
--json`. Each benchmark's table comes from the newest file that has it, so a later session that ran
only some benchmarks leaves the others' tables as they were (each such table names its file). The
table is never typed by hand: numbers reach the README only through this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench_report
import check_bars

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- perf:begin (scripts/render_readme.py) -->", "<!-- perf:end -->"
# The metrics the README shows, one table each (the results file has every metric): all of
# KEPT_METRICS unless a bench is listed here. Attention's TFLOP/s say what its ms and roofline% do.
KEPT_METRICS = ("ms", "TFLOP/s", "roofline%", "MiB", "tok/s", "MFU%")
# attention_masked keeps ms: its full-causal reference does other work, comparable in time only.
BENCH_METRICS = {"attention": ("TFLOP/s",), "attention_masked": ("ms", "TFLOP/s"),
                 "linear_cross_entropy": ("ms", "TFLOP/s", "MiB")}
# Said under a bench's title: how its numbers were taken where that is not the intro's device timing,
# and what a reader must know about its systems to compare them.
NOTES = {
    "rope": "The per-call overhead rows are host time per eager call on tiny tensors (perf_counter, in ms/call), "
            "not device time. liger rotates q and k in place (no output tensors).",
    "norm": "The per-call overhead rows are host time per eager call on tiny tensors (perf_counter, in ms/call), "
            "not device time.",
    "attention_masked": "TFLOP/s counts exactly the (query, key) pairs the window or the documents admit. "
                        "*-full-causal is SDPA causal over the whole sequence without that mask: other, larger "
                        "work (its own pairs), shown as the reference point of what the mask saves; compare its "
                        "ms. torch-flex is FlexAttention compiled, its block mask built outside the timing.",
    "linear_cross_entropy": "cce runs with its default filter_eps=\"auto\", which skips gradient blocks below a "
                            "threshold: its gradients are approximate, the others' exact.",
    "loader": "Host timing: tokens/s of (x, y) batches ready in host memory (perf_counter, median of 3 spans).",
    "train": "Host timing: the median perf_counter time of a whole step (one host sync per step), and tok/s and "
             "MFU% from it; MiB is the absolute torch.cuda.max_memory_allocated over the timed steps, not a "
             "peak above the inputs.",
}


def _shown(path: Path) -> str:
    """A results file as the README names it: relative to the repository (the tests render others)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def results_files(results_dir: Path) -> list[Path]:
    """The results files, oldest first (by the date their name ends with, then the name: two GPUs' files
    of one date otherwise came in the directory's listing order, which differs between machines)."""
    return sorted(results_dir.glob("*-????-??-??.json"), key=lambda p: (p.stem[-10:], p.name))


def render(results_dir: Path) -> str:
    report = bench_report.load()
    load_json, markdown = report.load_json, report.markdown

    files = results_files(results_dir)
    if not files:
        return ("No GPU results are committed yet: the benchmarks have only run on the CPU build machines, "
                "whose numbers prove the code paths, not the speed. Run the bench stages of `scripts/gpu_check.sh` "
                "on an H100 and commit their merged results as `benchmarks/results/<gpu>-<date>.json`.")
    # bench -> (file, header, its rows) from the newest file that has the bench
    chosen: dict[str, tuple[Path, dict, list]] = {}
    for path in reversed(files):
        head, rows = load_json(path)
        for bench in dict.fromkeys(r.bench for r in rows):
            chosen.setdefault(bench, (path, head, [r for r in rows if r.bench == bench]))
    path = files[-1]
    head = load_json(path)[0]
    gpu = not head["device"].startswith("cpu")
    timing = "CUDA-event timings" if gpu else "perf_counter timings"
    intro = (f"From `{_shown(path)}`: {head['device']}, {head['date']}, torch {head['torch']}, "
             f"CUDA {head['cuda']}; ceilings measured in the same run: copy {head['copy_gbps']:.0f} GB/s, "
             f"matmul {head['matmul_tflops']:.0f} TFLOP/s. Medians of {timing}, random inputs, unless a "
             f"table says otherwise.\n\n")
    tables, every = [], []
    for bench, (bpath, bhead, rows) in chosen.items():
        every += rows
        keep = [r for r in rows if r.metric in BENCH_METRICS.get(bench, KEPT_METRICS)]
        table = markdown(keep, by_metric=True, failed=[s for s in bhead.get("skipped", []) if s["bench"] == bench])
        title, body = table.split("\n\n", 1)
        notes = [NOTES[bench]] if bench in NOTES else []
        if (bhead["device"], bhead["date"]) != (head["device"], head["date"]):
            notes.insert(0, f"From `{_shown(bpath)}`: {bhead['device']}, {bhead['date']}, "
                            f"torch {bhead['torch']}, CUDA {bhead['cuda']}.")
        tables.append("\n\n".join([title, *notes, body]))
    if not gpu:
        return intro + "\n".join(tables)
    bars = "\n\n### Targets\n\nEach issue's bar against the same run's peer (`scripts/check_bars.py`):\n\n"
    return intro + "\n".join(tables) + bars + check_bars.table(every)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    new = text[:start] + "\n" + render(ROOT / "benchmarks" / "results") + "\n" + text[stop:]
    if args.check:
        if new != text:
            print("README.md performance section is stale: run python scripts/render_readme.py")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
