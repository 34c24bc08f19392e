#!/usr/bin/env python3
"""Static SASS statistics of each kernel's main loop: how many instructions one trip issues, how
many of them are tensor-core MMAs, what the rest are and which source lines they come from.

    scripts/sass_loop_stats.py OBJ [--kernel REGEX] [--lines N] [--inner] [--skip-lines A-B,C]

OBJ is an nvcc object or cubin holding one architecture's SASS, e.g. the CMake build's
build/<dir>/CMakeFiles/fmcore_kernels.dir/csrc/kernels/attention.cu.o (built with -lineinfo, so the
instructions carry their source lines). Needs cuobjdump and nvdisasm (on PATH, beside nvcc, or the
copies triton ships) and c++filt. A kernel's main loop is the loop (a backward branch and its
target) holding the most tensor-core instructions (mma.sync's HMMA, wgmma's HGMMA), the innermost
such one. Counts are static: every instruction between its head and its back edge, including code
most trips skip (the masking of boundary blocks, the checks of a tile that crosses the sequence
end); loops nested in it are listed, since their bodies run more than once a trip. --skip-lines
gives the count without the basic blocks whose instructions mostly come from those lines of the
kernel's file (line numbers as --inner shows them): an estimate of what a trip that skips that
code issues.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Opcode (without modifiers) -> the column it is counted in; every U* opcode is "uniform" (the
# uniform datapath: once a warp, not a thread).
CLASSES = {
    "tensor": {"HMMA", "HGMMA"},
    "smem": {"LDSM", "LDS", "STS"},
    "global": {"LDGSTS", "LDG", "STG", "RED", "REDG", "ATOM", "ATOMG", "LDGDEPBAR", "DEPBAR"},
    "local": {"LDL", "STL"},
    "fp32": {"FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FCHK", "F2FP", "MUFU"},
    "int": {"IMAD", "IADD3", "VIADD", "LEA", "SHF", "LOP3", "ISETP", "SEL", "IABS", "PRMT", "MOV",
            "IMNMX", "VIMNMX", "I2F", "F2I", "FLO", "POPC"},
    "uniform": set(),
    "control": {"BRA", "BAR", "BSSY", "BSYNC", "BREAK", "WARPSYNC", "EXIT", "CALL", "RET", "NOP",
                "SHFL", "VOTE", "S2R", "CS2R", "PLOP3", "P2R", "R2P"},
}


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None and (nvcc := shutil.which("nvcc")) is not None:
        found = shutil.which(name, path=str(Path(os.path.realpath(nvcc)).parent))
    if found is None:  # triton ships both
        pattern = f"{sys.prefix}/lib/python3*/site-packages/triton/backends/nvidia/bin/{name}"
        found = next(iter(sorted(glob.glob(pattern))), None)
    if found is None:
        sys.exit(f"{name} not found (PATH, beside nvcc, or triton's bundled copy)")
    return found


@dataclass
class Insn:
    addr: int
    opcode: str  # without modifiers: HMMA, LDSM, ...
    target: str | None  # a branch's label
    statement: str  # "file:line" of the kernel-body statement it belongs to ("" if unknown)
    line: str  # "file:line" of the innermost line of that file it comes from (in an inlined helper)


@dataclass
class Kernel:
    name: str
    insns: list[Insn]
    labels: dict[str, int]  # label -> index of the instruction it marks


_INSN = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.\S+)?\s*(.*);")
_LOC = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')


def parse(text: str) -> list[Kernel]:
    """nvdisasm -gi -c output -> its kernels."""
    kernels, cur, in_group, locs = [], None, False, []
    for raw in text.splitlines():
        if raw.startswith("//-") and ".text." in raw:
            cur = Kernel(raw.split(".text.", 1)[1].split()[0], [], {})
            kernels.append(cur)
        elif cur is None:
            continue
        elif (m := _LOC.match(raw)) is not None:
            # A group of these precedes each run of instructions, innermost first; the last one
            # (no "inlined at") is the statement in the kernel body.
            locs = (locs if in_group else []) + [(m.group(1), m.group(2))]
            in_group = True
            continue
        elif (m := re.match(r"^(\.L_x_\d+):", raw)) is not None:
            cur.labels[m.group(1)] = len(cur.insns)
        elif (m := _INSN.match(raw)) is not None:
            target = re.search(r"`\((\.L_x_\d+)\)", m.group(3)) if m.group(2) == "BRA" else None
            stmt = f"{locs[-1][0]}:{locs[-1][1]}" if locs else ""
            inner = next((f"{f}:{n}" for f, n in locs if f == locs[-1][0]), stmt)
            cur.insns.append(Insn(int(m.group(1), 16), m.group(2), target and target.group(1), stmt, inner))
        in_group = False
    return kernels


def loops(k: Kernel) -> list[tuple[int, int]]:
    """(first, last) instruction indices of each backward branch's range."""
    return [(k.labels[i.target], n) for n, i in enumerate(k.insns)
            if i.target is not None and k.labels.get(i.target, n + 1) <= n]


def blocks(k: Kernel, a: int, b: int) -> list[list[Insn]]:
    """The basic blocks of instructions a..b (split at labels and after branches)."""
    starts = {a} | {i for i in k.labels.values() if a < i <= b}
    starts |= {n + 1 for n in range(a, b) if k.insns[n].opcode in ("BRA", "EXIT", "RET", "CALL")}
    starts = sorted(starts)
    return [k.insns[s:e] for s, e in zip(starts, starts[1:] + [b + 1])]


def classify(opcode: str) -> str:
    if opcode.startswith("U"):
        return "uniform"
    return next((c for c, ops in CLASSES.items() if opcode in ops), "other")


def source_text(loc: str) -> str:
    path, _, n = loc.rpartition(":")
    try:
        return Path(path).read_text().splitlines()[int(n) - 1].strip()
    except (OSError, IndexError, ValueError):
        return ""


def line_number(loc: str) -> int:
    return int(loc.rpartition(":")[2] or 0)


def report(k: Kernel, name: str, resources: str, top: int, inner: bool, skip: set[int]) -> None:
    print(f"{name}  [{resources}]")
    tensor = CLASSES["tensor"]
    cands = [(sum(k.insns[i].opcode in tensor for i in range(a, b + 1)), -(b - a), a, b) for a, b in loops(k)]
    if not cands or max(cands)[0] == 0:
        print("  no loop with tensor-core instructions\n")
        return
    n_tensor, _, a, b = max(cands)
    body = k.insns[a : b + 1]
    kind = "/".join(sorted({i.opcode for i in body} & tensor))
    print(f"  main loop {body[0].addr:#x}-{body[-1].addr:#x}: {len(body)} instructions, {n_tensor} {kind} "
          f"({len(body) / n_tensor:.1f} per {kind})")
    for ia, ib in sorted(loops(k)):
        if a <= ia and ib <= b and (ia, ib) != (a, b):
            print(f"    nested loop {k.insns[ia].addr:#x}-{k.insns[ib].addr:#x}: {ib - ia + 1} instructions")
    if skip:
        kept = [blk for blk in blocks(k, a, b) if 2 * sum(line_number(i.line) in skip for i in blk) <= len(blk)]
        n = sum(map(len, kept))
        print(f"  without the blocks of the skipped lines: {n} instructions ({n / n_tensor:.1f} per {kind})")
    mix = Counter(classify(i.opcode) for i in body)
    print("  mix: " + ", ".join(f"{c} {mix[c]}" for c in [*CLASSES, "other"] if mix[c]))
    ops = Counter(i.opcode for i in body)
    print("  opcodes: " + ", ".join(f"{op} {n}" for op, n in ops.most_common()))
    if top:
        what = "the innermost line of the kernel's file" if inner else "the kernel-body statement"
        print(f"  source lines ({what} each instruction comes from):")
        for loc, n in Counter(i.line if inner else i.statement for i in body).most_common(top):
            print(f"    {n:5d}  {Path(loc).name}:{line_number(loc):<5} {source_text(loc)[:80]}")
    print()


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return [re.sub(r"\(anonymous namespace\)::|fmcore::", "", o) for o in out[: len(names)]]


def line_set(spec: str) -> set[int]:
    out = set()
    for part in filter(None, spec.split(",")):
        first, _, last = part.partition("-")
        out |= set(range(int(first), int(last or first) + 1))
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("obj", type=Path)
    ap.add_argument("--kernel", default=".", help="regex on the mangled kernel name")
    ap.add_argument("--lines", type=int, default=8, help="source lines to show a kernel (0: none)")
    ap.add_argument("--inner", action="store_true",
                    help="attribute to the innermost line of the kernel's file (inside inlined helpers) "
                         "instead of the kernel-body statement")
    ap.add_argument("--skip-lines", default="", help="e.g. 215-221,360: also count without their blocks")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cubins = [args.obj.resolve()]
        if args.obj.suffix != ".cubin":
            subprocess.run([tool("cuobjdump"), "-xelf", "all", str(args.obj.resolve())], cwd=tmp, check=True,
                           capture_output=True)
            cubins = sorted(Path(tmp).glob("*.cubin"))
        if len(cubins) != 1:
            sys.exit(f"{args.obj}: expected SASS for one architecture, found {len(cubins)} cubins")
        text = subprocess.run([tool("nvdisasm"), "-gi", "-c", str(cubins[0])], check=True, capture_output=True,
                              text=True).stdout
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubins[0])], check=True, capture_output=True,
                               text=True).stdout
    resources = dict(re.findall(r"Function (\S+):\n\s*(REG:\d+ STACK:\d+)", usage))
    kernels = [k for k in parse(text) if re.search(args.kernel, k.name)]
    for name, k in sorted(zip(demangle([k.name for k in kernels]), kernels), key=lambda nk: nk[0]):
        report(k, name, resources.get(k.name, "?"), args.lines, args.inner, line_set(args.skip_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
