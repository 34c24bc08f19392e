"""python/fmcore/bench/report.py (the results files' format) loaded by path, for the scripts that read
and write results: importing the fmcore package would need the compiled extension."""

import importlib.util
import sys
from pathlib import Path

_NAME = "fmcore_report"


def load():
    if _NAME not in sys.modules:  # once per process: render_readme.py also loads it through check_bars.py
        path = Path(__file__).resolve().parent.parent / "python/fmcore/bench/report.py"
        spec = importlib.util.spec_from_file_location(_NAME, path)
        report = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = report  # dataclasses look their module up while the class is created
        spec.loader.exec_module(report)
    return sys.modules[_NAME]
