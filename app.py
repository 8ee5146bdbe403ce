"""LFLLM web demo (gradio, as LISA's app.py): pick a bundled light field or upload one, type a referring
expression, see the answer, the mask on the centre view, the disparity, the CAAM-aggregated view and the
mask score.

    python app.py                                   # the quickstart's merged model, http://127.0.0.1:7860
    python app.py --version ./lfllm-7b-merged --host 0.0.0.0 --port 7860

The logic is in ``training/serve/demo.py`` (queries, uploads, pictures) and ``training/serve/demo_ui.py`` (the page).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from dataset.errors import DataError
from training.serve.demo import Demo, build_parser, load_examples, upload_limits
from training.serve.predict import Segmenter, parse_serve

HERE = Path(__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model once and serve the page until interrupted; returns the exit status."""
    parser = build_parser(str(HERE / "quickstart" / "merged"), str(HERE / "examples"))
    args, serve = parse_serve(parser, argv)
    if not Path(args.version).is_dir():
        print(
            f"error: {args.version}: no model there; run `bash scripts/quickstart.sh` first (it writes "
            "./quickstart/merged) or pass --version MERGED_DIR",
            file=sys.stderr,
        )
        return 1
    from training.serve.demo_ui import build_page, launch  # gradio is imported only when serving

    try:
        segmenter = Segmenter(serve)
    except (DataError, RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    demo = Demo(segmenter, load_examples(args.examples), limits=upload_limits(args.max_upload_mb))
    page = build_page(demo)
    print(f"LFLLM demo on http://{args.host}:{args.port} (model {args.version}); Ctrl+C stops it")
    launch(page, args.host, args.port, demo.limits.max_total_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
