"""Convert an original-format LLaVA checkpoint (liuhaotian/llava-v1.5-*) to a Hugging Face LLaVA directory.

Command-line shim over :func:`training.serve.convert_llava.main` (``--help`` lists every option)."""

import sys

from training.serve.convert_llava import main

if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as exc:
        sys.exit(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}")
