"""The web demo's page (gradio): light field + expression in, answer / mask overlay / disparity / CAAM view /
score out. The logic behind it is :class:`training.serve.demo.Demo`; ``app.py`` starts it.

Element ids (for people styling it and for the browser test): ``example``, ``upload``, ``expression``,
``describe``, ``run``, ``message``, ``answer``, ``description``, ``score``, ``overlay``, ``disparity``, ``caam``,
``preview``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo reports nothing anywhere

import gradio as gr
import numpy as np

from dataset.lightfield import read_rgb
from training.serve.demo import UPLOAD, Demo, DemoResult

INTRO = """# LFLLM: light-field referring segmentation
Pick a bundled light field (or upload one: a **.zip** of a scene folder in the Ref-UrbanLF layout, or the
centre view `5_5.png` with its neighbours `5_4.png`, `5_6.png`, `4_5.png`, `6_5.png`, plus an optional
`5_5_disparity.npy`; without one the disparity is estimated), type what to segment, and press **Segment**.
"""

#: System fonts only: the page loads nothing from outside the machine it is served from.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)


def _outputs(result: DemoResult) -> tuple:
    message = f"**⚠ {result.message}**" if result.message and result.overlay is None else result.message
    return (
        result.answer,
        result.score,
        result.overlay,
        result.disparity,
        result.caam,
        message,
        result.description,
    )


def build_page(demo: Demo) -> gr.Blocks:
    """The gradio page of ``demo``."""
    names = list(demo.examples)

    def preview(choice: str) -> np.ndarray | None:
        example = demo.examples.get(choice)
        return (
            None if example is None else read_rgb(example.scene_dir / demo.segmenter.layout.view_name((0, 0)))
        )

    def segment(choice: str, uploads: list[str] | None, expression: str, describe: bool = False) -> tuple:
        files = uploads if choice == UPLOAD else None
        if choice == UPLOAD and not uploads:
            return _outputs(DemoResult(message="Upload a light field first (a .zip or the view files)."))
        return _outputs(demo.run(choice, files, expression, bool(describe)))

    with gr.Blocks(title="LFLLM demo", analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                example = gr.Radio(
                    [*names, UPLOAD],
                    value=names[0] if names else UPLOAD,
                    label="Light field",
                    elem_id="example",
                )
                shown = gr.Image(
                    value=preview(names[0]) if names else None,
                    label="centre view",
                    interactive=False,
                    format="png",
                    elem_id="preview",
                )
                uploads = gr.File(
                    file_count="multiple",
                    file_types=[".zip", ".png", ".jpg", ".jpeg", ".npy"],
                    label="…or upload a light field",
                    elem_id="upload",
                )
                expression = gr.Textbox(
                    label="Expression", placeholder="the closest car", elem_id="expression"
                )
                describe = gr.Checkbox(
                    value=demo.segmenter.describe,
                    label="Segment, then describe (a model trained with --ilvc)",
                    elem_id="describe",
                )
                run = gr.Button("Segment", variant="primary", elem_id="run")
                pairs = [[e.name, x] for e in demo.examples.values() for x in e.expressions]
                if pairs:
                    gr.Examples(pairs, inputs=[example, expression], label="Try")
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                description = gr.Textbox(
                    label="Description of the segmented region", interactive=False, elem_id="description"
                )
                score = gr.Textbox(label="Mask score", interactive=False, elem_id="score")
                gr.Markdown("**Mask on the centre view**")
                overlay = gr.Image(
                    label="mask",
                    show_label=False,
                    interactive=False,
                    format="png",
                    buttons=["download"],
                    elem_id="overlay",
                )
        with gr.Row():
            with gr.Column():
                gr.Markdown("**Disparity** (px between adjacent views)")
                disparity = gr.Image(
                    label="disparity",
                    show_label=False,
                    interactive=False,
                    format="png",
                    buttons=["download"],
                    elem_id="disparity",
                )
            with gr.Column():
                gr.Markdown("**CAAM-aggregated view** (what the encoders see)")
                caam = gr.Image(
                    label="caam",
                    show_label=False,
                    interactive=False,
                    format="png",
                    buttons=["download"],
                    elem_id="caam",
                )
        example.change(preview, example, shown)
        uploads.upload(lambda _: UPLOAD, uploads, example)
        outputs = [answer, score, overlay, disparity, caam, message, description]
        inputs = [example, uploads, expression, describe]
        run.click(segment, inputs, outputs)
        expression.submit(segment, inputs, outputs)
    return page


def launch(page: gr.Blocks, host: str, port: int, max_upload_bytes: int, block: bool = True) -> str:
    """Serve ``page`` on ``host:port`` (uploads over ``max_upload_bytes`` refused); returns its URL.
    ``block=False`` returns at once (tests); the caller then stops it with ``page.close()``."""
    _, url, _ = page.launch(
        server_name=host,
        server_port=port,
        max_file_size=max_upload_bytes,
        prevent_thread_lock=not block,
        theme=THEME,
        footer_links=[],
        quiet=not block,
    )
    return url
