"""The data options a user chooses: file names of a light-field scene and where its disparity comes from.

One dataclass, each option's only default; ``training.config`` derives the flags of ``train_ds.py``,
``chat.py`` and the demo from it, and :class:`dataset.lightfield.LightFieldLayout` takes its defaults
from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from utils.conversation import TEMPLATES
from utils.options import option

DepthSource = Literal["file", "estimate"]
DEPTH_SOURCES: tuple[str, ...] = ("file", "estimate")

#: File name of the estimated map in each scene folder (script ``--out_name``, training
#: ``--estimated_disparity_name``).
DEFAULT_ESTIMATED_NAME = "5_5_disparity_est.npy"


def check_cache_name(name: str) -> str:
    """``name`` when it is a plain ``.npy`` file name; ``ValueError`` otherwise."""
    if not name or "/" in name or os.sep in name or name in (".npy", "..") or not name.endswith(".npy"):
        raise ValueError(
            f"the estimated-disparity file must be a plain file name ending in .npy, got {name!r}"
        )
    return name


@dataclass(frozen=True)
class DataOptions:
    """How a scene folder is read (the flags of every entry point that reads light fields)."""

    view_pattern: str = option("{row}_{col}.png", "file name of view (row, col), 1-based, centre 5_5")
    disparity_name: str = option("5_5_disparity.npy", "centre disparity file, e.g. 5_5_disparity_OAVC.npy")
    depth_source: str = option(
        "file",
        "file: read --disparity_name; estimate: the built-in estimator's maps, cached per scene",
        choices=DEPTH_SOURCES,
    )
    estimated_disparity_name: str = option(
        DEFAULT_ESTIMATED_NAME,
        "cache file of --depth_source estimate in each scene folder (scripts/estimate_disparity.py's "
        "--out_name); existing files are reused whatever settings wrote them",
        parse=check_cache_name,
    )

    @property
    def read_disparity_name(self) -> str:
        """The disparity file the datasets read: ``disparity_name``, or the estimator's cache file."""
        return self.estimated_disparity_name if self.depth_source == "estimate" else self.disparity_name


DEFAULT_DATA_OPTIONS = DataOptions()


@dataclass(frozen=True)
class PromptOptions:
    """How the conversations are written and bounded (train, merge record, chat, demo)."""

    conv_type: str = option("llava_v1", "chat template of the base language model", choices=sorted(TEMPLATES))
    model_max_length: int = option(
        512, "prompt length limit in tokens, each <image>/<depth> placeholder counted once (as the reference)"
    )


DEFAULT_PROMPT_OPTIONS = PromptOptions()
