"""The grid ceiling of a mask head: ground-truth masks pooled to a g x g token grid and upsampled back.

Command-line shim over :func:`training.experiments.grid_ceiling.main` (``--grids``, ``--geometry``, ``--json``,
``--dataset_dir``, ``--val_dataset``)."""

import sys

from training.experiments.grid_ceiling import main

if __name__ == "__main__":
    sys.exit(main())
