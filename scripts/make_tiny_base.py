"""Write a tiny HF LLaVA directory + tiny SAM checkpoint for the CPU quickstart and smoke runs.

Command-line shim over :func:`training.pretrain.tiny_base.main` (``--help`` lists every option)."""

import sys

from training.pretrain.tiny_base import main

if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as exc:
        sys.exit(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}")
