"""Merge the results files of one GPU session's benchmark groups into the file to commit:

    python scripts/merge_results.py OUT.json IN.json [IN.json ...]

Each (bench, case, system)'s rows come from the last IN file that measured it, so a later group cut
short replaces only what it measured; files from different GPUs, torch or CUDA versions are refused
(python/fmcore/bench/report.py's merge).
"""

import sys
from pathlib import Path

import bench_report


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    report = bench_report.load()
    head, rows = report.merge([Path(p) for p in argv[1:]])
    report.write_json(Path(argv[0]), head, rows)
    print(f"wrote {argv[0]}: {len(rows)} rows from {len(argv) - 1} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
