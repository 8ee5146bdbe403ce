"""What the centre image alone tells of depth in a generated benchmark: per depth kind, the share of sentences
the description alone, the ground-row rule or the disparity answers.

Command-line shim over :func:`training.experiments.depth_cues.main` (``--dataset_dir``, ``--ds``, ``--split``,
``--json``)."""

import sys

from training.experiments.depth_cues import main

if __name__ == "__main__":
    sys.exit(main())
