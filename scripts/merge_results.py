"""Merge the results files of one GPU session's benchmark groups into the file to commit:

    python scripts/merge_results.py OUT.json IN.json [IN.json ...]
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    # Load report.py by path, as render_readme.py does: no compiled extension is needed to merge.
    spec = importlib.util.spec_from_file_location("fmcore_report", ROOT / "python/fmcore/bench/report.py")
    report = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = report
    spec.loader.exec_module(report)
    head, rows = report.merge([Path(p) for p in argv[1:]])
    report.write_json(Path(argv[0]), head, rows)
    print(f"wrote {argv[0]}: {len(rows)} rows from {len(argv) - 1} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
