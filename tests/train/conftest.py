"""A small real dataset for the trainer tests: two standard-library packages, a 1024-token BPE."""

import email
import json
from pathlib import Path

import pytest

from fmcore import data


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stdlib-small"
    inputs = [Path(json.__file__).parent, Path(email.__file__).parent]
    return data.prepare(inputs, out, vocab_size=1024, val_fraction=0.1, workers=1, progress=False)
