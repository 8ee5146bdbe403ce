"""Names of the special tokens and the label id that every layer shares (tokenizer, prompts, collate, model).

Only names live here; the templates that use them are in ``dataset/prompts.py`` and the code that adds them
to a tokenizer is ``model/build.py``.
"""

from __future__ import annotations

SEG_TOKEN = "[SEG]"
#: The answer slot for an expression that names no object of the image (GRES; models built with ``gres``).
REJ_TOKEN = "[REJ]"
IMAGE_TOKEN = "<image>"
DEPTH_TOKEN = "<depth>"
#: The placeholder of a region's own visual tokens in an ILVC answer (``[SEG] <region> description [SEG]``,
#: LIRA's format; models built with ``region_token``); expanded like ``<image>``, never predicted.
REGION_TOKEN = "<region>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"

#: Label of positions that carry no language-model loss (prompt, visual tokens, padding).
IGNORE_INDEX = -100
