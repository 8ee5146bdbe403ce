"""Benchmark the raw data loading layer: SceneDataset items/s through a DataLoader.

Command-line shim over :func:`dataset.bench.main` (``--help`` lists every option)."""

from dataset.bench import main

if __name__ == "__main__":
    main()
