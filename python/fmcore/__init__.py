"""fmcore: fast training of transformer foundation models on PyTorch.

Importing fmcore loads the native extension, which registers every op under ``torch.ops.fmcore``
(CPU always, CUDA when compiled in). The public API lives in the subpackages:

- ``fmcore.ops``   drop-in tensor ops (rope, attention, cross-entropy, ...)
- ``fmcore.nn``    modules built from them
- ``fmcore.optim`` the fused AdamW optimizer
- ``fmcore.data``  shards, ``fmcore prepare`` and the C++ loader
- ``fmcore.train`` the trainer
- ``fmcore.hf``    fmcore's kernels in a Hugging Face transformers model (needs transformers)
"""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from fmcore import _C
from fmcore._info import build_info

__version__ = "0.1.0"
__all__ = ["build_info", "__version__"]

from fmcore import nn, ops, optim  # noqa: E402,F401  (ops registers fake and autograd formulas)


def __getattr__(name: str):
    # fmcore.hf imports transformers (the optional "hf" extra): loaded on first use, never by `import fmcore`.
    if name == "hf":
        import importlib

        return importlib.import_module("fmcore.hf")
    raise AttributeError(f"module 'fmcore' has no attribute {name!r}")
