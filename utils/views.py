"""View names <-> angular offsets of a light-field grid (pure functions, no files).

UrbanLF names views ``<row>_<col>`` (1-based, centre ``5_5`` of a 9×9 grid). A neighbour is addressed by
its offset ``(drow, dcol) = (row − 5, col − 5)`` from the centre: ``5_4`` (left of the centre) is
``(0, -1)`` and ``4_5`` (above it) is ``(-1, 0)``. The file names themselves are the data layer's
(``dataset.lightfield.LightFieldLayout``).
"""

from __future__ import annotations

import re
from typing import Protocol

Offset = tuple[int, int]

_FOUR: tuple[Offset, ...] = ((0, -1), (0, 1), (-1, 0), (1, 0))
_DIAGONALS: tuple[Offset, ...] = ((-1, -1), (-1, 1), (1, -1), (1, 1))
_CROSS2: tuple[Offset, ...] = (*_FOUR, (0, -2), (0, 2), (-2, 0), (2, 0))

#: Named neighbour sets as ``(drow, dcol)`` offsets from the centre view, in loading order.
NEIGHBOURHOODS: dict[str, tuple[Offset, ...]] = {
    "4": _FOUR,
    "8": (*_FOUR, *_DIAGONALS),
    "cross2": _CROSS2,
}

_VIEW_NAME = re.compile(r"^\s*(\d+)_(\d+)\s*$")


class HasCenter(Protocol):
    """Anything with a 1-based ``center`` view index ``(row, col)`` (e.g. a ``LightFieldLayout``)."""

    center: Offset


def _center_of(grid: Offset | HasCenter) -> Offset:
    center = getattr(grid, "center", grid)
    return (int(center[0]), int(center[1]))


def parse_views(spec: str, grid: Offset | HasCenter = (5, 5)) -> tuple[Offset, ...]:
    """Turn a view spec into ``(drow, dcol)`` offsets.

    ``spec`` is a name of :data:`NEIGHBOURHOODS` (``"4"``, ``"8"``, ``"cross2"``) or a comma-separated
    list of absolute 1-based view names such as ``"5_4,5_6,4_5,6_5"`` (made relative to the centre of
    ``grid``: a ``(row, col)`` pair or an object with ``.center``). Raises ``ValueError`` on anything else,
    on duplicates, and on the centre itself.
    """
    center = _center_of(grid)
    name = spec.strip()
    if name in NEIGHBOURHOODS:
        return NEIGHBOURHOODS[name]
    known = ", ".join(repr(k) for k in NEIGHBOURHOODS)
    if not name:
        raise ValueError(f"empty view spec; use one of {known} or a list like '5_4,5_6,4_5,6_5'")
    offsets: list[Offset] = []
    for item in name.split(","):
        match = _VIEW_NAME.match(item)
        if match is None:
            raise ValueError(
                f"bad view spec {spec!r}: {item.strip()!r} is neither a neighbourhood ({known}) "
                "nor a view name '<row>_<col>' (1-based, e.g. '5_4')"
            )
        row, col = int(match.group(1)), int(match.group(2))
        if row < 1 or col < 1:
            raise ValueError(f"bad view spec {spec!r}: view {item.strip()!r} is not 1-based")
        offset = (row - center[0], col - center[1])
        if offset == (0, 0):
            raise ValueError(f"bad view spec {spec!r}: {item.strip()!r} is the centre view; list neighbours")
        if offset in offsets:
            raise ValueError(f"bad view spec {spec!r}: view {item.strip()!r} is listed twice")
        offsets.append(offset)
    return tuple(offsets)


def view_set_offsets(spec: str, center: Offset = (5, 5)) -> tuple[Offset, ...]:
    """Neighbour offsets ``(drow, dcol)`` (centre excluded) of a view-set spec.

    ``"cross"``: the centre row and column of the ``(2c-1) x (2c-1)`` grid (``c`` = centre index, 1-based);
    ``"full"``: every view of that grid; anything else goes to :func:`parse_views` (``"4"``, ``"8"``,
    ``"cross2"`` or ``"5_1,5_9,..."``). Raises ``ValueError`` on an unknown spec.
    """
    reach_r, reach_c = center[0] - 1, center[1] - 1
    name = spec.strip()
    if name == "cross":
        horiz = [(0, k) for k in range(-reach_c, reach_c + 1) if k]
        vert = [(k, 0) for k in range(-reach_r, reach_r + 1) if k]
        return tuple(horiz + vert)
    if name == "full":
        return tuple(
            (r, q)
            for r in range(-reach_r, reach_r + 1)
            for q in range(-reach_c, reach_c + 1)
            if (r, q) != (0, 0)
        )
    return parse_views(name, center)
