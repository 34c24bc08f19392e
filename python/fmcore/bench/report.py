"""Result rows, the markdown table, the JSON file and the plots.

A row is {bench, case, system, metric, value, unit}. Vocabulary (keep results comparable across
issues and dates): bench names rope, cross_entropy, linear_cross_entropy, adamw, attention, loader,
train; systems fmcore (and variants fmcore-<what>), torch-eager, torch-compile, torch-fused, torch-foreach, sdpa-flash,
sdpa-cudnn, sdpa-mem-efficient, liger, cce, nanogpt-get-batch, torch-dataloader; metrics ms
(median), GB/s, TFLOP/s, MiB (peak above inputs), tok/s, MFU%, and roofline% (of the copy bandwidth
or matmul rate measured in the same run; unit says which).
"""

from __future__ import annotations

import datetime
import json
import platform
from collections import defaultdict
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


def header(device: torch.device, roofline) -> dict:
    from fmcore._info import build_info

    info = build_info()
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fmcore_cuda_archs": info["cuda_archs"],
        "copy_gbps": roofline.copy_gbps,
        "matmul_tflops": roofline.matmul_tflops,
    }


def markdown(rows: list[Row], *, by_metric: bool = False) -> str:
    """One table per bench: a line per case, a column per (system, metric). by_metric: a line per
    (case, metric), a column per system (narrower: what the README shows)."""
    out = []
    by_bench: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_bench[r.bench].append(r)
    for bench, brows in by_bench.items():
        cases = list(dict.fromkeys(r.case for r in brows))
        metrics = list(dict.fromkeys(r.metric for r in brows))
        cell = {(r.case, r.system, r.metric): r.value for r in brows}
        fmt = lambda vals: " | ".join("-" if v is None else f"{v:.4g}" for v in vals)  # noqa: E731
        if not by_metric:
            columns = list(dict.fromkeys((r.system, r.metric) for r in brows))
            out += [f"### {bench}\n", "| case | " + " | ".join(f"{s} {m}" for s, m in columns) + " |",
                    "|---" * (len(columns) + 1) + "|"]
            out += [f"| {c} | " + fmt(cell.get((c, s, m)) for s, m in columns) + " |" for c in cases]
        else:
            systems = list(dict.fromkeys(r.system for r in brows))
            one = len(metrics) == 1  # the metric goes in the title instead of a column
            out += [f"### {bench} ({metrics[0]})\n" if one else f"### {bench}\n",
                    "| case | " + ("" if one else "metric | ") + " | ".join(systems) + " |",
                    "|---" * (len(systems) + 1 + (not one)) + "|"]
            out += [f"| {c} | " + ("" if one else f"{m} | ") + fmt(cell.get((c, s, m)) for s in systems) + " |"
                    for c in cases for m in metrics if any((c, s, m) in cell for s in systems)]
        out.append("")
    return "\n".join(out)


def write_json(path: Path, head: dict, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": head, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")


def load_json(path: Path) -> tuple[dict, list[Row]]:
    data = json.loads(Path(path).read_text())
    return data["header"], [Row(**r) for r in data["rows"]]


def merge(paths: list[Path]) -> tuple[dict, list[Row]]:
    """One results file from several runs on the same GPU (the device tool allows 10 minutes a call, so
    the benchmarks run in groups): the first run's header with every run's header under "runs" (each
    row's roofline% was taken against its own run's ceilings), and every bench's rows from the last
    file that has it."""
    heads, by_bench = [], {}
    for path in paths:
        head, rows = load_json(path)
        heads.append(head)
        fresh: dict[str, list[Row]] = defaultdict(list)
        for r in rows:
            fresh[r.bench].append(r)
        by_bench.update(fresh)
    devices = {h["device"] for h in heads}
    if len(devices) != 1:
        raise ValueError(f"results from different devices cannot be merged: {sorted(devices)}")
    return {**heads[0], "runs": heads}, [r for rows in by_bench.values() for r in rows]


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
                xs = [c + i * width for c in range(len(cases))]
                ax.bar(xs, [val.get((case, system), 0.0) for case in cases], width, label=system)
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
