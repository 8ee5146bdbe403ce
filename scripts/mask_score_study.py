"""Which mask score tracks the true IoU (Spearman rank correlation on a validation set, + scatter plot).

Command-line shim over :func:`training.experiments.score_study.main` (``--out`` + ``train_ds.py --eval_only`` flags)."""

from training.experiments.score_study import main

if __name__ == "__main__":
    main()
