"""CLI: run benchmarks, print a markdown table, optionally write JSON rows and PNG charts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fmcore.bench import BENCHMARKS, SKIPPED, BenchContext, load
from fmcore.bench import report, roofline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fmcore.bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path, help="write the header and rows here")
    parser.add_argument("--plot", type=Path, help="write one PNG bar chart per benchmark into this folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="small shapes (the default on the CPU)")
    args = parser.parse_args(argv)

    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r}: expected cpu or cuda[:N]")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: expected cpu or cuda[:N]")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        parser.error(f"--device {args.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:  # before anything is measured
        parser.error(f"unknown benchmark {', '.join(map(repr, unknown))}; known: {', '.join(BENCHMARKS)}")
    # The output folders, made before anything is measured: a --plot under a file failed after the whole run.
    for flag, folder in (("--json", args.json and args.json.parent), ("--plot", args.plot)):
        try:
            if folder:
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"{flag}: cannot make {folder}: {e.strerror}: {e.filename}")
    if args.json and args.json.is_dir():
        parser.error(f"--json {args.json} is a directory; name the file to write")
    modules = [load(n) for n in names]
    roof = roofline.measure(device)
    print(f"# roofline on {device}: copy {roof.copy_gbps:.0f} GB/s, matmul {roof.matmul_tflops:.2f} TFLOP/s",
          flush=True)
    ctx = BenchContext(device=device, roofline=roof, quick=args.quick or device.type != "cuda")
    rows: list[report.Row] = []
    head = report.header(device, roof)
    SKIPPED.clear()

    def save():
        if args.json:  # the peers that failed, so that their absent rows read as failed, not as not run
            report.write_json(args.json, {**head, "skipped": list(SKIPPED)}, rows)

    for name, module in zip(names, modules):
        print(f"# running {name} ...", flush=True)
        # Every run() yields its rows as each system is measured, and the file is rewritten after every
        # row: a run stopped at a time limit (gpu_check.sh's SIGINT) keeps what it measured.
        for row in module.run(ctx):
            rows.append(row)
            save()
        save()  # a peer skipped after the last row
    print(report.markdown(rows, failed=SKIPPED))
    if args.json:
        print(f"# wrote {args.json}")
    if args.plot:
        for path in report.plot(rows, args.plot):
            print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
