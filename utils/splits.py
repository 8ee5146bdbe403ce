"""Split names and evaluation-subset tags of Ref-UrbanLF (shared by the REFER reader and the metrics)."""

from __future__ import annotations

#: Evaluation subsets of Ref-UrbanLF, in table order (occlusion level, then depth attribute).
SUBSET_TAGS: tuple[str, ...] = ("no-o", "o-1", "o-2", "o-3", "distance", "closest", "behind", "front", "near")
#: Split names that are not subsets.
SPLIT_NAMES: frozenset[str] = frozenset({"train", "val", "test", "testA", "testB"})
