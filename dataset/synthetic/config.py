"""Settings of the synthetic light-field benchmark generator (one dataclass, validated on creation)."""

from __future__ import annotations

from dataclasses import dataclass

from dataset.synthetic.shapes import CATEGORIES, CATEGORY_COLOURS, PALETTE

MIN_SIZE = 32
"""Smallest image side (px) the generator accepts."""
MAX_OBJECTS = sum(len(CATEGORY_COLOURS.get(c, tuple(PALETTE))) for c in CATEGORIES if c != "bridge") + 1
"""Objects per scene at most: every object but a same-looking twin needs its own (category, colour), and a
scene holds at most one bridge; also keeps ``ann_id = image_id * 100 + layer_id`` unique."""


@dataclass
class SyntheticConfig:
    """Generator settings; ``same_looking_prob`` is the share of scenes with a same-looking pair."""

    height: int = 480
    width: int = 640
    angular: int = 9
    num_train: int = 172
    num_val: int = 40
    min_objects: int = 3
    max_objects: int = 6
    seed: int = 0
    ds_name: str = "ref-urbanlf-syn"
    disparity_name: str = "5_5_disparity.npy"
    same_looking_prob: float = 0.4
    gres: bool = False  # add GRES refs (several targets, or none: dataset.synthetic.gres) beside the others
    tasks: bool = False  # also write VQA and reasoning-segmentation data (dataset.synthetic.tasks)
    perspective: float = (
        1.0  # how much an object's placement follows its disparity (1: nearer = lower, larger)
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting the generator cannot honour."""
        if self.height < MIN_SIZE or self.width < MIN_SIZE:
            raise ValueError(f"height and width must be >= {MIN_SIZE} px, got {self.height}x{self.width}")
        if self.angular < 3 or self.angular % 2 == 0:
            raise ValueError(
                f"angular must be odd and >= 3 (a centre view with neighbours), got {self.angular}"
            )
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError(f"num_train and num_val must be >= 0, got {self.num_train}, {self.num_val}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS} (distinct looks), "
                f"got {self.min_objects}..{self.max_objects}"
            )
        if not 0.0 <= self.same_looking_prob <= 1.0:
            raise ValueError(f"same_looking_prob must be in [0, 1], got {self.same_looking_prob}")
        if not 0.0 <= self.perspective <= 1.0:
            raise ValueError(f"perspective must be in [0, 1], got {self.perspective}")
        if not self.ds_name or "/" in self.ds_name or "|" in self.ds_name:
            raise ValueError(
                f"ds_name must be a non-empty folder name without '/' or '|', got {self.ds_name!r}"
            )
        if not self.disparity_name or "/" in self.disparity_name:
            raise ValueError(f"disparity_name must be a file name, got {self.disparity_name!r}")

    @property
    def centre(self) -> int:
        """1-based index of the centre view on each angular axis (5 for a 9x9 grid)."""
        return (self.angular + 1) // 2

    def split_of(self, image_id: int) -> str:
        return "train" if image_id <= self.num_train else "val"
