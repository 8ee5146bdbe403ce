"""Benchmark the training data path with and without the per-scene feature cache (scenes/s per worker).

Command-line shim over :func:`training.experiments.bench_loader.main` (``--help`` lists every option)."""

from training.experiments.bench_loader import main

if __name__ == "__main__":
    main()
