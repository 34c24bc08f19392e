"""The `fmcore` command: `fmcore info`, `fmcore bench ...` (more subcommands join as they land)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "info": "print the build: torch/CUDA versions, archs, which ops have CUDA kernels",
        "bench": "run the benchmarks against every importable peer (see `fmcore bench -h`)",
        "plan-memory": "per-GPU memory of a training config in its parallel layout (see `fmcore plan-memory -h`)",
        "prepare": "raw text (or the embedded stdlib corpus) to token shards + manifest (see `fmcore prepare -h`)",
        "train": "train a model: `fmcore train [CONFIG.toml|PRESET] [--section.key value ...]` (see -h)",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog="fmcore", description="fmcore command line")
        parser.add_argument("command", choices=list(commands), help="; ".join(f"{k}: {v}" for k, v in commands.items()))
        parser.parse_args(argv[:1])
        return 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        from fmcore._info import format_build_info

        print(format_build_info())
        return 0
    if command == "bench":
        from fmcore.bench.__main__ import main as bench_main

        return bench_main(rest)
    if command == "prepare":
        from fmcore.data.prepare import main as prepare_main

        return prepare_main(rest)
    if command == "train":
        from fmcore.train.trainer import main as train_main

        return train_main(rest)
    if command == "plan-memory":
        from fmcore.train.plan import main as plan_main

        return plan_main(rest)
    raise AssertionError(command)


if __name__ == "__main__":
    sys.exit(main())
