"""Result rows, the markdown table, the JSON file and the plots.

A row is {bench, case, system, metric, value, unit}. Vocabulary (keep results comparable across
issues and dates): bench names rope, cross_entropy, linear_cross_entropy, adamw, attention,
attention_masked, loader, train; systems fmcore (and variants fmcore-<what>), torch-eager,
torch-compile, torch-fused, torch-foreach, sdpa-flash, sdpa-cudnn, sdpa-mem-efficient, torch-flex,
torch-varlen, flash-attn, <system>-full-causal (a reference point without the case's mask), liger, cce,
nanogpt-get-batch, torch-dataloader; metrics ms (median), GB/s, TFLOP/s, MiB (peak above inputs),
tok/s, MFU%, and roofline% (of the copy bandwidth or matmul rate measured in the same run; unit says
which).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Row:
    bench: str
    case: str
    system: str
    metric: str
    value: float
    unit: str


def git_commit() -> str | None:
    """The fmcore checkout's short commit hash, with "+dirty" when its tree has uncommitted changes;
    None when fmcore does not run from a git checkout (an installed wheel, a copied tree) unless
    FMCORE_COMMIT names it (the GPU machine gets a copy of the tree without .git)."""
    if os.environ.get("FMCORE_COMMIT"):
        return os.environ["FMCORE_COMMIT"]
    here = Path(__file__).resolve()
    repo = here.parents[3]  # <repo>/python/fmcore/bench/report.py

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        # Only fmcore's own checkout: not some enclosing repository that happens to hold an install.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != repo:
            return None
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def header(device: torch.device, roofline) -> dict:
    from fmcore._info import build_info

    info = build_info()
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fmcore_commit": git_commit(),  # what code produced these numbers
        "fmcore_cuda_archs": info["cuda_archs"],
        "copy_gbps": roofline.copy_gbps,
        "matmul_tflops": roofline.matmul_tflops,
    }


FAILED = "failed"  # a peer that raised (the header's "skipped"): not the "-" of not applicable


def covers(skipped_case: str, case: str) -> bool:
    """Whether a skip recorded for skipped_case covers the rows of case: a benchmark skips a system
    for a case whose rows may add a phase ("<case> fwd", "<case> bwd")."""
    return case == skipped_case or case.startswith(skipped_case + " ")


def markdown(rows: list[Row], *, by_metric: bool = False, failed: Sequence[dict] = ()) -> str:
    """One table per bench: a line per case, a column per (system, metric). by_metric: a line per
    (case, metric), a column per system (narrower: what the README shows). failed: the header's
    "skipped" entries {bench, case, system, ...}: their empty cells read "failed", not "-"."""
    out = []
    by_bench: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_bench[r.bench].append(r)
    for bench, brows in by_bench.items():
        cases = list(dict.fromkeys(r.case for r in brows))
        metrics = list(dict.fromkeys(r.metric for r in brows))
        cell = {(r.case, r.system, r.metric): r.value for r in brows}
        fails = [(f["case"], f["system"]) for f in failed if f["bench"] == bench]
        measured = {(r.case, r.metric) for r in brows}  # a failed cell only where some system has a value
        for c, s in fails:  # a peer that failed on every case has no rows, but gets its column
            cell.update({(case, s, m): FAILED for case, m in measured if covers(c, case) and (case, s, m) not in cell})
        shown = [False]

        def fmt(vals):
            vals = list(vals)
            shown[0] |= FAILED in vals
            return " | ".join("-" if v is None else v if v == FAILED else f"{v:.4g}" for v in vals)

        if not by_metric:
            columns = list(dict.fromkeys((r.system, r.metric) for r in brows))
            columns += [(s, m) for s in dict.fromkeys(s for _, s in fails) for m in metrics
                        if (s, m) not in columns and any(cell.get((c, s, m)) == FAILED for c in cases)]
            out += [f"### {bench}\n", "| case | " + " | ".join(f"{s} {m}" for s, m in columns) + " |",
                    "|---" * (len(columns) + 1) + "|"]
            out += [f"| {c} | " + fmt(cell.get((c, s, m)) for s, m in columns) + " |" for c in cases]
        else:
            systems = list(dict.fromkeys([r.system for r in brows] + [s for _, s in fails]))
            one = len(metrics) == 1  # the metric goes in the title instead of a column
            out += [f"### {bench} ({metrics[0]})\n" if one else f"### {bench}\n",
                    "| case | " + ("" if one else "metric | ") + " | ".join(systems) + " |",
                    "|---" * (len(systems) + 1 + (not one)) + "|"]
            out += [f"| {c} | " + ("" if one else f"{m} | ") + fmt(cell.get((c, s, m)) for s in systems) + " |"
                    for c in cases for m in metrics if any((c, s, m) in cell for s in systems)]
        if shown[0]:
            out += ["", f"{FAILED}: the peer raised on this case in this run (the log names the error); "
                        "-: not measured or not applicable."]
        out.append("")
    return "\n".join(out)


def write_json(path: Path, head: dict, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": head, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")


def load_json(path: Path) -> tuple[dict, list[Row]]:
    data = json.loads(Path(path).read_text())
    return data["header"], [Row(**r) for r in data["rows"]]


def merge(paths: list[Path]) -> tuple[dict, list[Row]]:
    """One results file from several runs on the same GPU, torch and CUDA (the device tool allows 10
    minutes a call, so the benchmarks run in groups): the newest run's date, the first run's other
    header fields with every run's header under "runs" (each row's roofline% was taken against its own
    run's ceilings), and each (bench, case, system)'s rows from the last file that measured it, so a
    later run cut short replaces only what it measured. The peers skipped in any run ("skipped") are
    kept unless a run measured them."""
    heads, by_key = [], {}
    for path in paths:
        head, rows = load_json(path)
        heads.append(head)
        fresh: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
        for r in rows:
            fresh[(r.bench, r.case, r.system)].append(r)
        by_key.update(fresh)
    # Numbers from different GPUs or software stacks are not one table's: refuse, naming the files.
    for field, what in (("device", "devices"), ("torch", "torch versions"), ("cuda", "CUDA versions")):
        seen = {str(h.get(field)): str(p) for h, p in zip(heads, paths)}
        if len(seen) != 1:
            raise ValueError(f"results from different {what} cannot be merged: "
                             + ", ".join(f"{v} ({p})" for v, p in seen.items()))
    rows = [r for rows in by_key.values() for r in rows]
    skipped = []
    for skip in (skip for h in heads for skip in h.get("skipped", [])):
        ran = any(b == skip["bench"] and s == skip["system"] and covers(skip["case"], c) for b, c, s in by_key)
        if not ran and skip not in skipped:
            skipped.append(skip)
    return {**heads[0], "date": max(h["date"] for h in heads), "skipped": skipped, "runs": heads}, rows


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    """One PNG per bench: median ms per system for each case, and roofline% where measured (a bench
    with neither, like the loader's tok/s, plots the first metric it reports)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for bench in dict.fromkeys(r.bench for r in rows):
        brows = [r for r in rows if r.bench == bench]
        metrics = [m for m in ("ms", "roofline%") if any(r.metric == m for r in brows)] or [brows[0].metric]
        fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            mrows = [r for r in brows if r.metric == metric]
            cases = list(dict.fromkeys(r.case for r in mrows))
            systems = list(dict.fromkeys(r.system for r in mrows))
            width = 0.8 / max(len(systems), 1)
            val = {(r.case, r.system): r.value for r in mrows}
            for i, system in enumerate(systems):
                # Only the cases this system measured: a missing or failed peer is no bar, never a 0 ms one.
                xs = [c + i * width for c, case in enumerate(cases) if (case, system) in val]
                ax.bar(xs, [val[(case, system)] for case in cases if (case, system) in val], width, label=system)
            ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], cases, rotation=15, fontsize=7)
            ax.set_ylabel(metric if metric == "ms" else mrows[0].unit)
            ax.set_title(f"{bench}: {metric}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{bench}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
