"""Pretrain the tiny LLaVA + SAM base on generated 2D scenes (SAM's and LLaVA's pretraining in miniature).

Command-line shim over :func:`training.pretrain.base.main` (``--help`` lists every option). Rerun the same
command after a kill to resume from ``--out``/.work."""

import sys

from training.pretrain.base import main

if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
