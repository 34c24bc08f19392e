"""The `fmcore` command: `fmcore info`, `fmcore bench ...` (more subcommands join as they land)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "info": "print the build: torch/CUDA versions, archs, which ops have CUDA kernels",
        "bench": "run the benchmarks against every importable peer (see `fmcore bench -h`)",
        "plan-memory": "per-GPU memory of a training config in its parallel layout (see `fmcore plan-memory -h`)",
        "prepare": "raw text (or the embedded stdlib corpus) to token shards + manifest (see `fmcore prepare -h`)",
        "train": "train a model: `fmcore train [CONFIG.toml|PRESET] [--section.key value ...]` (see -h)",
        "export": "a run's checkpoint (any step, layout, world size) to a Hugging Face directory: "
                  "`fmcore export RUN_DIR [--step N] [--out DIR]` (see -h)",
    }
    if not argv or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog="fmcore", description="fmcore command line")
        parser.add_argument("command", choices=list(commands), help="; ".join(f"{k}: {v}" for k, v in commands.items()))
        parser.parse_args(argv[:1])  # exits: the help for -h (status 0), else the usage and the error (2)
    command, rest = argv[0], argv[1:]
    try:
        if command == "info":
            from fmcore._info import format_build_info

            print(format_build_info())
            return 0
        # (imported when chosen: each pulls in what only it needs)
        module = {"bench": "fmcore.bench.__main__", "prepare": "fmcore.data.prepare", "train": "fmcore.train.trainer",
                  "plan-memory": "fmcore.train.plan", "export": "fmcore.train.export_run"}[command]
        return importlib.import_module(module).main(rest)
    except BrokenPipeError:
        # The reader closed stdout early (`fmcore train --help | head`, 17 KB of help): it has what it wanted,
        # not a traceback. stdout goes to /dev/null, or the interpreter's exit would flush into the closed pipe
        # again and print another error. 141 = 128 + SIGPIPE, the shell's convention.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
