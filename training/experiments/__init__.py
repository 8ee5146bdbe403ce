"""Experiments and developer tools: step/data benchmarks, the ablation, the [SEG] oracle, the score study."""
