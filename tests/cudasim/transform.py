"""Source transform that turns one of fmcore's CUDA kernel files into C++ for fmsim (fmsim.h).

The rewrites, each keeping the line count so compiler messages point at the original lines
(the output starts with `#line 1 "<original path>"`):
- `kernel<targs><<<grid, block, smem, stream>>>(args);` (kernel expressions with template
  arguments, launches spread over several lines) becomes
  `fmsim::launch(kernel<targs>, fmsim::kernel_name("kernel<targs>", __PRETTY_FUNCTION__),
  fmsim::Config(grid, block, smem, stream), args);` (the name resolves a template parameter)
- `extern __shared__ T name[];` becomes `T* name = fmsim::dynamic_smem<T>();`
- `__shared__ T name[N]...;` becomes `static T name[N]...; fmsim::shared_region(name, sizeof(name));`
  (blocks run one at a time, so a function-local static is exactly one block's shared memory; the
  runtime fills every region it has seen with NaN bytes before each block, as it does the dynamic
  shared memory: a read before the block's first write shows up).
- `__launch_bounds__(args)` is removed from the declaration and `fmsim::launch_bounds(args);` is
  put first in the kernel's body (launching more threads than the bound fails on hardware).
- `reinterpret_cast<` becomes `fmsim::rcast<` (the same cast plus an alignment check).
- `#include "ptx.cuh"` (the inline PTX wrappers) becomes `#include "fmsim_ptx.h"` (fmsim's
  models of those instructions); inline asm anywhere else is refused.
- `#include "<name>.cuh"` of a header beside the kernel file (attention.cu's attention_wgmma.cuh,
  common.cuh; wgmma_probe.cu includes attention_wgmma.cuh too) is replaced by the header,
  rewritten the same way (once; #line markers keep its line numbers): such headers hold kernel code.
Anything the transform does not recognise raises ValueError rather than passing through.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _matching(src: str, open_at: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing the one at open_at."""
    depth = 0
    for i in range(open_at, len(src)):
        if src[i] == open_ch:
            depth += 1
        elif src[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_ch} at offset {open_at}")


def _line(src: str, at: int) -> int:
    return src.count("\n", 0, at) + 1


_KERNEL_EXPR = re.compile(r"^[A-Za-z_][\w:]*(<.*>)?$", re.S)


def _launches(src: str) -> str:
    out, pos = [], 0
    while (at := src.find("<<<", pos)) >= 0:
        start = max(src.rfind(c, 0, at) for c in ";{}") + 1
        # skip whole-line comments between the previous statement and the kernel expression
        while (m := re.match(r"\s*//[^\n]*\n", src[start:at])) is not None:
            start += m.end()
        kernel = src[start:at].strip()
        if not _KERNEL_EXPR.match(kernel):
            raise ValueError(f"line {_line(src, at)}: unrecognised kernel expression {kernel!r}")
        cfg_end = src.find(">>>", at)
        config = src[at + 3 : cfg_end]
        paren = cfg_end + 3
        while src[paren].isspace():
            paren += 1
        if src[paren] != "(":
            raise ValueError(f"line {_line(src, at)}: expected ( after >>>")
        close = _matching(src, paren, "(", ")")
        args = src[paren + 1 : close]
        lead = src[start:at][: len(src[start:at]) - len(src[start:at].lstrip())]
        name = " ".join(kernel.split())
        call = f'fmsim::launch({kernel}, fmsim::kernel_name("{name}", __PRETTY_FUNCTION__), fmsim::Config({config})'
        call += f", {args})" if args.strip() else ")"
        newlines = src.count("\n", start, close + 1) - call.count("\n") - lead.count("\n")
        out.append(src[pos:start] + lead + call + "\n" * max(newlines, 0))
        pos = close + 1
    out.append(src[pos:])
    return "".join(out)


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<>, ]+?)\s+(\w+)\s*\[\s*\]\s*;")


_STATIC_SHARED = re.compile(r"(?<![\w ])(\s*)__shared__\s+([^;{}()]+?)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")


def _static_shared(src: str) -> str:
    src = _STATIC_SHARED.sub(r"\1static \2 \3\4; fmsim::shared_region(\3, sizeof(\3));", src)
    for m in re.finditer(r"__shared__", src):
        raise ValueError(f"line {_line(src, m.start())}: unrecognised __shared__ declaration")
    return src


def _launch_bounds(src: str) -> str:
    while (at := src.find("__launch_bounds__(")) >= 0:
        open_at = at + len("__launch_bounds__")
        close = _matching(src, open_at, "(", ")")
        args = src[open_at + 1 : close]
        body = src.find("{", close)
        if body < 0 or ";" in src[close:body]:
            raise ValueError(f"line {_line(src, at)}: no kernel body after __launch_bounds__")
        src = (
            src[:at] + src[close + 1 : body + 1] + f" fmsim::launch_bounds({args});" + src[body + 1 :]
        )
    return src


def _rewrite(src: str, path: str) -> str:
    src = _EXTERN_SHARED.sub(r"\1* \2 = fmsim::dynamic_smem<\1>();", src)
    if "extern __shared__" in src:
        raise ValueError(f"{path}: unrecognised extern __shared__ declaration")
    src = _static_shared(src)
    src = _launch_bounds(src)
    src = _launches(src)
    src = src.replace("reinterpret_cast<", "fmsim::rcast<")
    src = src.replace('#include "ptx.cuh"', '#include "fmsim_ptx.h"')
    if (m := re.search(r"\basm\b", src)) is not None:
        raise ValueError(f"line {_line(src, m.start())}: inline asm (fmsim models only ptx.cuh's)")
    return src


def _with_parts(src: str, path: Path, inlined: set[Path]) -> str:
    """src rewritten, with each `#include "<name>.cuh"` of a header beside it inlined (rewritten the
    same way, once each, between #line markers)."""
    try:
        src = _rewrite(src, str(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None

    def inline(m: re.Match) -> str:
        part = path.parent / m[1]
        if part in inlined:
            return ""
        inlined.add(part)
        text = re.sub(r"^#pragma once$", "", part.read_text(), flags=re.M)
        line = _line(src, m.start())
        return (f'#line 1 "{part}"\n' + _with_parts(text, part, inlined) +
                f'\n#line {line + 1} "{path}"')

    return re.sub(r'^#include "(\w+\.cuh)"$', inline, src, flags=re.M)


def transform(src: str, path: str) -> str:
    """One kernel file (a translation unit) as C++ for fmsim. The `.cuh` headers beside it that it
    includes (attention.cu's attention_mma.cuh...) are rewritten and inlined: they hold kernels too."""
    tu = Path(path)
    body = _with_parts(src, tu, set())
    return f'#define FMSIM_KERNEL_TU 1\n#include "fmsim.h"\n#line 1 "{path}"\n' + body


def main(argv: list[str]) -> int:
    """transform.py IN.cu OUT.cpp (for looking at what the simulator compiles)."""
    src = Path(argv[0]).read_text()
    Path(argv[1]).write_text(transform(src, str(Path(argv[0]).resolve())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
