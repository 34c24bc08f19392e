"""CPU-side benchmarks under pytest-benchmark: `pytest benchmarks --benchmark-only`."""
