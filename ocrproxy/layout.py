"""Lines of text in reading order, rebuilt from the boxes a text detector found.

Theory of operation: a box engine (PP-OCR through ``local_rapid``) returns one quadrilateral
and its text per run of text, in no useful order. ``lines`` turns them into what a text model
needs: lines in reading order, columns kept apart, table rows kept whole.

1. Deskew. A photographed page is tilted; grouping tilted boxes by their raw y pairs a price
   with the next item on a receipt. The dominant text angle is the median angle of the boxes'
   top edges; every box's corners are rotated back by it and the box becomes the upright
   rectangle around them.
2. Blocks, by a recursive cut. A region is cut at a vertical gutter (a band no box crosses,
   from the region's top to its bottom, at least GUTTER heights of text wide) when the two
   sides are independent columns: most of the smaller side's lines sit beside lines of the
   other side, but do not line up with them (a sidebar beside a page). Rows that do line up
   across the gutter are a table, and stay together; sides that never sit beside each other
   (left and right chat bubbles) are read top to bottom; so are a sidebar's few items that
   all fall in the gaps between a page's lines, which geometry cannot tell from a chat.
   Otherwise the region is cut at every horizontal gap taller than BAND heights of text
   (sections, paragraphs, chat bubbles), and each piece is cut again. The rule Tesseract's
   page layout follows too: a wide gap splits columns, read one after the other.
3. Rows. In each block, boxes are sorted by their centre's y and join the current row while
   their centre is within half a text height of the row's; each row is read left to right,
   its boxes separated by one space, or by WIDE_SPACE where the gap is wider than WIDE_GAP
   heights (the cells of a table row, as Tesseract's ``preserve_interword_spaces`` keeps them).

Blocks are separated by a blank line. Everything here is pure and needs no OCR package.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# A vertical gutter must be at least this many text heights wide to split columns.
GUTTER = 2.0
# A horizontal gap at least this many text heights tall separates blocks.
BAND = 1.0
# Boxes of one row further apart than this many text heights are table cells: WIDE_SPACE apart.
WIDE_GAP = 2.0
WIDE_SPACE = "   "
# Two sides of a gutter are columns when at least SIDE_BY_SIDE of the smaller side's lines sit
# beside the other side's, and fewer than ALIGNED of those line up with them (a table's do).
SIDE_BY_SIDE = 0.5
ALIGNED = 0.6
# Lines across a gutter line up (a table row) when their middles are this many text heights
# apart at most: a table's cells share a baseline, so their boxes' middles are within 1-2 px.
ROW_ALIGNED = 0.12
# A side with fewer lines than this is never a column of its own (a lone label, a button).
MIN_COLUMN_LINES = 3

Point = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Box:
    """An upright rectangle of text (after deskewing)."""

    left: float
    top: float
    right: float
    bottom: float
    text: str

    @property
    def height(self) -> float:
        return max(1.0, self.bottom - self.top)

    @property
    def middle(self) -> float:
        return (self.top + self.bottom) / 2


def skew(quads: Sequence[Sequence[Point]]) -> float:
    """The dominant text angle (radians): the median angle of the boxes' top edges.

    A quad's corners run clockwise from the top left, as PP-OCR gives them.
    """
    angles = [math.atan2(q[1][1] - q[0][1], q[1][0] - q[0][0]) for q in quads if q[1][0] > q[0][0]]
    return statistics.median(angles) if angles else 0.0


def deskew(quads: Sequence[Sequence[Point]], texts: Sequence[str]) -> list[Box]:
    """Upright boxes: each quad rotated back by the dominant angle, then its bounding box."""
    theta = skew(quads)
    c, s = math.cos(-theta), math.sin(-theta)
    boxes = []
    for quad, text in zip(quads, texts, strict=True):
        xs = [x * c - y * s for x, y in quad]
        ys = [x * s + y * c for x, y in quad]
        boxes.append(Box(min(xs), min(ys), max(xs), max(ys), text))
    return boxes


def rows(boxes: Sequence[Box]) -> list[list[Box]]:
    """Boxes grouped into rows by their centres' y, each row sorted left to right."""
    found: list[list[Box]] = []
    for box in sorted(boxes, key=lambda b: b.middle):
        if found:
            row = found[-1]
            middle = statistics.fmean(b.middle for b in row)
            height = statistics.median(b.height for b in row)
            if abs(box.middle - middle) < 0.5 * min(box.height, height):
                row.append(box)
                continue
        found.append([box])
    return [sorted(row, key=lambda b: b.left) for row in found]


def join(row: Sequence[Box]) -> str:
    """One row's text, cells far apart kept apart by WIDE_SPACE."""
    height = statistics.median(b.height for b in row)
    parts = [row[0].text.strip()]
    for before, box in zip(row, row[1:], strict=False):
        parts.append(WIDE_SPACE if box.left - before.right > WIDE_GAP * height else " ")
        parts.append(box.text.strip())
    return "".join(parts)


def _gaps(spans: list[tuple[float, float]], least: float) -> list[tuple[float, float]]:
    """The gaps of at least ``least`` between the union of ``spans``, widest first."""
    spans.sort()
    gaps = []
    reach = spans[0][1]
    for start, end in spans[1:]:
        if start - reach >= least:
            gaps.append((reach, start))
        reach = max(reach, end)
    return sorted(gaps, key=lambda g: g[0] - g[1])


def _independent(left: list[Box], right: list[Box]) -> bool:
    """Whether two sides of a gutter are separate columns rather than a table or a chat."""
    a, b = rows(left), rows(right)
    if min(len(a), len(b)) < MIN_COLUMN_LINES:
        return False
    if len(a) > len(b):
        a, b = b, a
    beside = aligned = 0
    for line in a:
        top, bottom = min(x.top for x in line), max(x.bottom for x in line)
        middle, height = statistics.fmean(x.middle for x in line), line[0].height
        near = [
            other
            for other in b
            if min(x.top for x in other) < bottom and max(x.bottom for x in other) > top
        ]
        if near:
            beside += 1
            other_middle = min(
                (statistics.fmean(x.middle for x in o) for o in near),
                key=lambda m: abs(m - middle),
            )
            aligned += abs(other_middle - middle) < ROW_ALIGNED * height
    return beside >= SIDE_BY_SIDE * len(a) and aligned < ALIGNED * beside


def blocks(boxes: list[Box]) -> list[list[Box]]:
    """The region's boxes as blocks in reading order (the recursive cut of the docstring)."""
    if len(boxes) < 2:
        return [boxes]
    height = statistics.median(b.height for b in boxes)
    for start, end in _gaps([(b.left, b.right) for b in boxes], GUTTER * height):
        left = [b for b in boxes if b.right <= start]
        right = [b for b in boxes if b.left >= end]
        if _independent(left, right):
            return blocks(left) + blocks(right)
    bands: list[list[Box]] = []
    reach = -math.inf
    for box in sorted(boxes, key=lambda b: b.top):
        if not bands or box.top - reach >= BAND * height:
            bands.append([])
        bands[-1].append(box)
        reach = max(reach, box.bottom)
    if len(bands) == 1:
        return bands
    return [block for band in bands for block in blocks(band)]


def lines(quads: Sequence[Sequence[Point]], texts: Sequence[str]) -> str:
    """The text of an image from its boxes: lines in reading order, blocks a blank line apart."""
    kept = [(q, t) for q, t in zip(quads, texts, strict=True) if t.strip()]
    if not kept:
        return ""
    boxes = deskew([q for q, _ in kept], [t for _, t in kept])
    return "\n\n".join("\n".join(join(row) for row in rows(block)) for block in blocks(boxes))
