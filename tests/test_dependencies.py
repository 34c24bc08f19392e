"""Every third-party module fmcore's code imports is one that pyproject.toml declares, so that a
fresh `pip install fmcore` runs: a required dependency (with a marker where only some Pythons need
it: tomli, the config parser before Python 3.11, was once imported and not declared, so that
`fmcore train` failed on 3.10), or an optional one (an extra), without which fmcore still imports."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import fmcore
from fmcore.train.config import tomllib  # (the standard library's, or tomli on Python 3.10)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Standard-library modules of Pythons newer than the oldest fmcore supports (imported with a fallback)
NEWER_STDLIB = {"tomllib"}  # 3.11


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()  # PEP 503's normalized project name


@functools.cache
def _project() -> dict:
    """pyproject.toml's [project] table."""
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _declared() -> tuple[dict[str, Requirement], set[str]]:
    """(required dependencies by normalized name, the names of the extras' dependencies)."""
    project = _project()
    required = {_name(r.name): r for r in map(Requirement, project["dependencies"])}
    extras = {_name(Requirement(r).name) for group in project["optional-dependencies"].values() for r in group}
    return required, extras


def _imports() -> dict[str, list[str]]:
    """{top-level module: [file:line]} of the absolute imports in fmcore's installed sources (the files
    a wheel ships, wherever the tests run from), at any depth (a function's lazy imports too)."""
    root = Path(fmcore.__file__).parent
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append(f"{path.relative_to(root)}:{node.lineno}")
    return found


@functools.cache
def _distribution(module: str) -> str:
    """The normalized project that provides an import name (itself when no installed one does: tomli
    on a Python that does not need it)."""
    return _name(importlib.metadata.packages_distributions().get(module, [module])[0])


def test_the_scan_sees_fmcores_imports():
    imports = _imports()
    assert {"torch", "numpy", "tqdm", "tokenizers", "safetensors", "matplotlib", "tomli"} <= set(imports)
    assert "fmcore" in imports and "os" in imports


def test_every_third_party_import_is_declared():
    required, extras = _declared()
    undeclared = {}
    for module, places in _imports().items():
        if module in sys.stdlib_module_names or module in NEWER_STDLIB or module == "fmcore":
            continue
        if _distribution(module) not in required and _distribution(module) not in extras:
            undeclared[module] = places
    assert not undeclared, f"imported by fmcore, declared nowhere in pyproject.toml: {undeclared}"


def test_fmcore_imports_without_its_optional_dependencies():
    # In a fresh interpreter whose imports of the extras' packages fail (a None in sys.modules): every
    # module of fmcore loads, except fmcore.hf, the transformers integration, which says what to install.
    required, extras = _declared()
    optional = extras - set(required)
    blocked = sorted({m for m, dists in importlib.metadata.packages_distributions().items()
                      if any(_name(d) in optional for d in dists)} | {d.replace("-", "_") for d in optional})
    script = f"""
import importlib, pkgutil, sys
for name in {blocked!r}:
    sys.modules[name] = None
import fmcore
for m in pkgutil.walk_packages(fmcore.__path__, "fmcore."):
    if m.name != "fmcore.hf" and not m.name.endswith("__main__"):
        importlib.import_module(m.name)
try:
    import fmcore.hf
except ImportError as e:
    print(e)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "fmcore.hf needs transformers: pip install 'fmcore[hf]'"
    assert "transformers" in blocked and "pyarrow" in blocked and "tensorboard" in blocked


def test_the_config_parser_is_installed_where_the_standard_library_lacks_it():
    tomli = _declared()[0]["tomli"]  # tomllib joined the standard library in Python 3.11
    assert _project()["requires-python"] == ">=3.10"
    assert tomli.marker is not None
    assert [tomli.marker.evaluate({"python_version": v}) for v in ("3.10", "3.11", "3.13")] == [True, False, False]


def test_fmcore_hf_names_the_transformers_it_needs():
    transformers = pytest.importorskip("transformers", minversion="5.24")
    hf = importlib.import_module("fmcore.hf")
    floor = next(r.specifier for r in map(Requirement, _project()["optional-dependencies"]["hf"])
                 if _name(r.name) == "transformers")
    assert floor == SpecifierSet(f">={'.'.join(map(str, hf.MIN_TRANSFORMERS))}")
    assert transformers.__version__ in floor
    # An older one (5.23 computed wrong logits under fmcore.hf, silently) is refused by name.
    script = "import transformers; transformers.__version__ = '5.23.0'; import fmcore.hf"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "ImportError: fmcore.hf needs transformers >= 5.24 (Python 3.11 or later), found 5.23.0" in done.stderr
