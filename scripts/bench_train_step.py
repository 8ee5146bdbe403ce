"""Benchmark one LFLLM training step (the DeepSpeed step of ``train_ds.py``), validation and chat latency.

Command-line shim over :func:`training.experiments.bench_step.main` (``--help`` lists every option)."""

from training.experiments.bench_step import main

if __name__ == "__main__":
    main()
