"""fmcore's compact trainer: ``fmcore train [CONFIG.toml|PRESET] [--section.key value ...]``.

- config.py      the dataclass config tree, TOML + command-line overrides, presets/
- models/        GPT-2 and Llama on fmcore ops (or plain PyTorch), parameter and FLOP counts
- schedule.py    learning-rate schedules
- checkpoint.py  torch.distributed.checkpoint save/resume, retention
- export.py      safetensors + config.json for Hugging Face transformers
- export_run.py  ``fmcore export RUN_DIR``: any checkpoint of a run, in any layout, as such a directory
- metrics.py     progress bar / plain lines, JSON Lines, TensorBoard, loss-curve PNG, summary
- trainer.py     the loop and ``main(argv)``
"""

from fmcore.train.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "main"]


def main(argv: list[str] | None = None) -> int:
    from fmcore.train.trainer import main as _main

    return _main(argv)
