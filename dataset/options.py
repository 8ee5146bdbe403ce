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
from utils.options import at_least, option

#: What a scene set's light-field input may be replaced with, to measure what a model reads
#: (``dataset.scenes.SceneDataset(probe=…)``, ``--eval_input``).
PROBES: tuple[str, ...] = ("exact", "swapped_disparity", "centre_views")

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


def per_dataset(text: str) -> dict[str, str] | str:
    """``"a=x,b=y"`` -> ``{"a": "x", "b": "y"}`` (a value per dataset); a plain ``"x"`` stays ``"x"``.
    Raises ``ValueError`` on an empty name or value."""
    if "=" not in text:
        return text
    out = {}
    for item in text.split(","):
        ds, _, value = item.partition("=")
        if not ds.strip() or not value.strip():
            raise ValueError(f"{text!r}: expected 'dataset=value,dataset=value', got item {item!r}")
        out[ds.strip()] = value.strip()
    return out


def _scene_pattern(text: str) -> str:
    for pattern in (v for v in (per_dataset(text).values() if "=" in text else [text])):
        if "{image_id}" not in pattern.rsplit("/", 1)[-1]:
            raise ValueError(f"{pattern!r}: the last folder of the pattern must contain {{image_id}}")
        try:
            pattern.format(ds="x", image_id=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{pattern!r}: only {{ds}} and {{image_id}} may be used ({exc})") from None
    return text


def _disparity_names(text: str) -> str:
    for name in per_dataset(text).values() if "=" in text else [text]:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"{name!r}: expected a file name inside the scene folder")
    return text


def _view_pattern(text: str) -> str:
    try:
        names = {text.format(row=r, col=c) for r, c in ((4, 5), (5, 4), (4, 4), (5, 5))}
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{text!r}: a str.format template with {{row}} and {{col}} only ({exc})") from None
    if len(names) < 4 or "/" in text:
        raise ValueError(f"{text!r}: must name each view by {{row}} and {{col}}, without folders")
    return text


@dataclass(frozen=True)
class DataOptions:
    """How a scene folder is read (the flags of every entry point that reads light fields)."""

    view_pattern: str = option(
        "{row}_{col}.png",
        "file name of view (row, col), 1-based, centre 5_5",
        parse=_view_pattern,
        resume=True,
    )
    disparity_name: str = option(
        "5_5_disparity.npy",
        "centre disparity file, e.g. 5_5_disparity_OAVC.npy; per dataset: "
        "'ref-urbanlf-syn=5_5_disparity_OAVC.npy,ref-urbanlf-real=disparity_OAVC.npy'",
        parse=_disparity_names,
        resume=True,
    )
    lf_dir_pattern: str = option(
        "lf/{ds}/Image{image_id}",
        "scene folder of an image, relative to --dataset_dir ({ds}: dataset name); per dataset: "
        "'ds=pattern,ds2=pattern', e.g. the release's 'images/urbanlf/syn/val/new/Image{image_id}'",
        parse=_scene_pattern,
        resume=True,
    )
    depth_source: str = option(
        "file",
        "file: read --disparity_name; estimate: the built-in estimator's maps, cached per scene",
        choices=DEPTH_SOURCES,
        resume=True,
    )
    estimated_disparity_name: str = option(
        DEFAULT_ESTIMATED_NAME,
        "cache file of --depth_source estimate in each scene folder (scripts/estimate_disparity.py's "
        "--out_name); existing files are reused whatever settings wrote them",
        parse=check_cache_name,
        resume=True,
    )

    def read_disparity_name(self, ds: str | None = None) -> str:
        """The disparity file the datasets read for dataset ``ds``: ``disparity_name`` (its entry for
        ``ds`` when given per dataset), or the estimator's cache file with ``depth_source="estimate"``."""
        if self.depth_source == "estimate":
            return self.estimated_disparity_name
        return self._for(self.disparity_name, ds, "--disparity_name")

    def scene_root_and_pattern(self, ds: str) -> tuple[str, str]:
        """(scene root relative to the dataset dir, scene folder pattern) of dataset ``ds``:
        ``lf/{ds}/Image{image_id}`` -> (``lf/<ds>``, ``Image{image_id}``)."""
        pattern = self._for(self.lf_dir_pattern, ds, "--lf_dir_pattern")
        root, _, scene = pattern.rpartition("/")
        return root.format(ds=ds, image_id="{image_id}"), scene

    @staticmethod
    def _for(value: str, ds: str | None, flag: str) -> str:
        mapping = per_dataset(value)
        if isinstance(mapping, str):
            return mapping
        if ds is None or ds not in mapping:
            raise ValueError(f"{flag} {value!r}: no entry for dataset {ds!r}")
        return mapping[ds]


DEFAULT_DATA_OPTIONS = DataOptions()


@dataclass(frozen=True)
class PromptOptions:
    """How the conversations are written and bounded (train, merge record, chat, demo)."""

    conv_type: str = option(
        "llava_v1", "chat template of the base language model", choices=sorted(TEMPLATES), resume=True
    )
    model_max_length: int = option(
        512,
        "prompt length limit in tokens, each <image>/<depth> placeholder counted once (as the reference)",
        resume=True,
        check=at_least(1),
    )


DEFAULT_PROMPT_OPTIONS = PromptOptions()
