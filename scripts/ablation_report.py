"""The LISA-vs-LFLLM ablation's helpers for scripts/ablate.sh: the run plan, the val-set subset check, and the
report (mean ± std tables in the paper's layout, JSON summary, bar plot).

Command-line shim over :func:`training.experiments.ablation.main` (``--help`` lists the subcommands)."""

import sys

from training.experiments.ablation import main

if __name__ == "__main__":
    sys.exit(main())
