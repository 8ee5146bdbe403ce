"""Object hallucination in POPE's recipe: yes/no "Is there a <object> in the image?" on generated light fields.

Command-line shim over :func:`training.experiments.pope.main` (``--version`` a merged model, ``--dataset_dir``,
``--ds``, ``--split``, ``--k``, ``--seed``, ``--style``, ``--batch_size``, ``--out`` + the chat's model flags)."""

import sys

from training.experiments.pope import main

if __name__ == "__main__":
    sys.exit(main())
