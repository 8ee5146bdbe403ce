"""The [SEG] ceiling: LFLLM's mask head trained and scored with an oracle in place of the language model.

Command-line shim over :func:`training.experiments.seg_oracle.main` (``--mode``, ``--eval_every``, ``--out`` + ``train_ds.py``
training flags)."""

from training.experiments.seg_oracle import main

if __name__ == "__main__":
    main()
