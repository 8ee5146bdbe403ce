"""Accuracy of the built-in disparity estimator against ground truth (UrbanLF depth-benchmark conventions).

Command-line shim over :func:`dataset.disparity.evaluate.main` (``--help`` lists every option)."""

import sys

from dataset.disparity.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
