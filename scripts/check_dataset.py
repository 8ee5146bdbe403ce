"""Check a dataset before training on it: every scene of the splits a run would read, all problems at once.

The same check ``train_ds.py`` runs before it builds the model (files present, decodable image headers,
view sizes, disparity dtype/shape/range), with ``train_ds.py``'s flags::

    .venv/bin/python scripts/check_dataset.py --dataset_dir ./dataset --refer_seg_data ref-urbanlf-syn \\
        --val_dataset "ref-urbanlf-syn|syn|val"

Command-line shim over :func:`training.preflight.check_main` (``--help`` lists every option)."""

import sys

from training.preflight import check_main

if __name__ == "__main__":
    sys.exit(check_main())
