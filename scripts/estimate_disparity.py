"""Estimate the centre-view disparity of every light-field scene with the built-in estimator.

Command-line shim over :func:`dataset.disparity.cli.main` (``--help`` lists every option)."""

import sys

from dataset.disparity.cli import main

if __name__ == "__main__":
    sys.exit(main())
