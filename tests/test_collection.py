"""`python -m pytest tests` (the README's test command) must reach every test file.

pytest skips, silently, any directory matching its `norecursedirs` patterns, whose defaults include
`dist` and `build`: the multi-process tests lived in `tests/dist` from the first sessions to the
twenty-first and never ran under the README's command or CI (48 tests, found by counting them).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

TESTS = Path(__file__).parent


def test_no_test_directory_is_skipped_by_norecursedirs(pytestconfig):
    patterns = pytestconfig.getini("norecursedirs")
    skipped = [str(d.relative_to(TESTS)) for d in TESTS.rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("test_*.py"))
               and any(fnmatch.fnmatch(d.name, p) for p in patterns)]
    assert not skipped, f"pytest never collects these test directories (norecursedirs {patterns}): {skipped}"
