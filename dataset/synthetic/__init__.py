"""The procedural light-field benchmark (Ref-UrbanLF layout): the public names of the generator.

Files: ``config.py`` (settings), ``shapes.py`` (category silhouettes and textures), ``layout.py`` (scene
sampling and rendering of every view), ``expressions.py`` (unambiguous referring expressions),
``generator.py`` (records and ``write_dataset``), ``gres.py`` (several targets or none, ``--gres``),
``tasks.py`` + ``task_texts.py`` (VQA and reasoning segmentation, ``--tasks``), ``cli.py``
(``scripts/make_synthetic_data.py``).
"""

from dataset.synthetic.config import SyntheticConfig
from dataset.synthetic.expressions import DEPTH_KINDS, DEPTH_MARGIN, NEAR_DISPARITY, Expression, SceneObject
from dataset.synthetic.generator import (
    OCCLUSION_THRESHOLDS,
    SyntheticScene,
    occlusion_tag,
    render_scene,
    write_dataset,
)
from dataset.synthetic.shapes import CATEGORIES, PALETTE

__all__ = [
    "CATEGORIES",
    "DEPTH_KINDS",
    "DEPTH_MARGIN",
    "NEAR_DISPARITY",
    "OCCLUSION_THRESHOLDS",
    "PALETTE",
    "Expression",
    "SceneObject",
    "SyntheticConfig",
    "SyntheticScene",
    "occlusion_tag",
    "render_scene",
    "write_dataset",
]
