"""The compute of the two mask heads (SAM route vs light route) at a preset's shapes, counted on the meta device.

Command-line shim over :func:`training.experiments.head_flops.main` (``--preset``, ``--images``,
``--expressions``, ``--light_dim``, ``--detail_size``, ``--json``)."""

import sys

from training.experiments.head_flops import main

if __name__ == "__main__":
    sys.exit(main())
