"""Tables (mean ± std per subset) and a bar plot of evaluated models, one row per model, one file per seed.

Command-line shim over :func:`training.experiments.compare.main`::

    python scripts/compare_evals.py --row "plain=a/eval.json,b/eval.json" --row "fusion=c/eval.json,d/eval.json" \
        --out runs/compare --title "Mask routes" [--baseline_row plain]
"""

import sys

from training.experiments.compare import main

if __name__ == "__main__":
    sys.exit(main())
