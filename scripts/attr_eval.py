"""AttrEval on light fields: linear probes of the [SEG] state for the target's attributes, and their link to IoU.

Command-line shim over :func:`training.experiments.attr_eval.main` (``--out``, ``--train_split``,
``--scenes_per_batch``, ``--l2`` + ``train_ds.py --eval_only`` flags)."""

from training.experiments.attr_eval import main

if __name__ == "__main__":
    main()
