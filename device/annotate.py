"""``edgeq run --annotate PATH``: what the device saw, with what it said drawn on it.

Each detection's box carries its label, score and uncertainty (unfamiliarity percentile when the bundle has a
density, else predictive entropy); a result flagged for review is drawn in red with a thicker frame and its
reason. A classifier's top result is written in the top-left corner the same way. Frames narrower than 384 px are
written enlarged by a whole factor (the demo's 128-px frames at 384 px), so that text is at least 14 px tall;
tags never overlap one another, and boxes never cross a tag. PATH ending in ``.mp4`` or
``.avi`` writes an MPEG-4 Part 2 video (mp4v in MP4, XVID in AVI: drawing and writing a demo-clip frame took
0.51 ms with MJPG, 0.28 ms with XVID, benchmarks/annotate.py; files about a quarter of MJPG's, measured by
hand; the labels' filled tags took part of that time off too); any other PATH without a suffix is a folder of
JPEGs, one per frame, named by ``seq``. Drawing runs on its own thread (``edgeq-draw``, device/outbox.py) once
a frame's results are stored, never on the inference thread, and nothing of this module is imported when
annotation is off.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import ConfigError

VIDEO_CODECS = {".mp4": "mp4v", ".avi": "XVID"}
TRUSTED = (80, 200, 60)  # BGR
FLAGGED = (40, 40, 230)
UNKNOWN = (200, 60, 200)  # an object of no known class (label "unknown", schema 4)
TEXT_ON = {TRUSTED: (0, 0, 0), FLAGGED: (255, 255, 255), UNKNOWN: (255, 255, 255)}  # text on each label colour
DEFAULT_FPS = 10.0
# the JPEG folder's quality: OpenCV's default is 95; at 90 a demo-clip frame encodes in 0.90x the time into 0.73x
# the bytes, and the labels' text stays sharp (measured by hand)
JPEG_QUALITY = 90


def check_target(path: str) -> Path:
    """The annotation target, checked before any work: a supported extension, a folder that can take files."""
    from edgeq.fsutil import probe_writable

    target = Path(path)
    suffix = target.suffix.lower()
    if suffix and suffix not in VIDEO_CODECS:
        raise ConfigError(f"--annotate {path}: unsupported extension {target.suffix!r}; give a .mp4 or .avi file, "
                          "or a folder for JPEGs")
    folder = target.parent if suffix else target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_writable(folder)
    except OSError as exc:
        raise ConfigError(f"--annotate {path}: cannot write there ({exc.strerror or exc}); choose a writable "
                          "folder") from None
    return target


def describe(item: dict[str, Any]) -> tuple[str, str | None]:
    """The text drawn for one result, and its review reason (None: trusted or not judged)."""
    u = item.get("uncertainty") or {}
    if item.get("label") == "unknown" and item.get("nearest_label"):
        text = f"unknown (nearest {item['nearest_label']}) obj {item.get('objectness', item['score']):.2f}"
    else:
        text = f"{item['label']} {item['score']:.2f}"
    if u.get("unfamiliarity_percentile") is not None:
        text += f" unf p{u['unfamiliarity_percentile']:.0f}"
    elif u.get("predictive_entropy") is not None:
        text += f" H {u['predictive_entropy']:.2f}"
    reason = (item.get("review_reason") or "review") if item.get("needs_review") else None
    return text, reason


class Annotator:
    """Draws results on frames and writes them to ``target`` (see the module's docstring)."""

    def __init__(self, target: Path, fps: float | None) -> None:
        self.target = target
        self.fps = fps or DEFAULT_FPS
        self.video = target.suffix.lower() in VIDEO_CODECS
        self.writer: Any = None
        self.frames = 0

    def add(self, image: np.ndarray, message: dict[str, Any]) -> np.ndarray:
        """Draw ``message`` on a copy of ``image``, write it, and return it."""
        canvas = draw(image, message)
        self._write(canvas, int(message["seq"]))
        return canvas

    def _write(self, canvas: np.ndarray, seq: int) -> None:
        import cv2

        if not self.video:
            if not cv2.imwrite(str(self.target / f"{seq:08d}.jpg"), canvas, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
                raise ConfigError(f"--annotate {self.target}: cannot write {seq:08d}.jpg")
            self.frames += 1
            return
        if self.writer is None:
            h, w = canvas.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*VIDEO_CODECS[self.target.suffix.lower()])
            self.writer = cv2.VideoWriter(str(self.target), fourcc, self.fps, (w, h))
            if not self.writer.isOpened():
                raise ConfigError(f"--annotate {self.target}: OpenCV cannot write this video format here; try .avi")
        self.writer.write(canvas)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None


# a frame narrower than this is drawn on a copy enlarged by a whole factor (nearest neighbour: each camera pixel
# becomes a k x k block, nothing is invented), so that a tag's text is readable on the demo's 128-px frames. 384
# is the least width on which four boxes' tags (about 190 px each at CAP_PX) still find room; encoding the
# enlarged frame is most of what --annotate costs, and a 768-px canvas (640, the earlier choice, on a 192-px
# clip) took 3.2 ms a frame against 1.2 ms at 384 (measured by hand, draw + .avi write)
MIN_WIDTH = 384
CAP_PX = 14  # the least height of a capital letter of a tag's text, in pixels of the written frame
FONT_CAP_AT_1 = 27  # FONT_HERSHEY_SIMPLEX's capital height at scale 1.0 (cv2.getTextSize("A", ..., 1.0, 1))


def enlargement(width: int) -> int:
    """The whole factor a frame ``width`` pixels wide is enlarged by before drawing (1: drawn as it is)."""
    return 1 if width >= MIN_WIDTH else -(-MIN_WIDTH // max(width, 1))


def font_scale(width: int) -> float:
    """The text scale on a frame ``width`` pixels wide (after enlargement): capitals at least CAP_PX tall,
    growing with the frame up to 0.8 (0.55 on a 640 to 770-px frame)."""
    return max(CAP_PX / FONT_CAP_AT_1, min(width / 1400, 0.8))


def _text_width(text: str, scale: float) -> int:
    import cv2

    return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]


@functools.lru_cache(maxsize=16)
def _line_height(scale: float) -> int:
    """Pixels from one line of label text to the next at ``scale`` (the same for every frame of a run)."""
    import cv2

    return cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][1] + 8


Rect = tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive of x0/y0, exclusive of x1/y1


TAG_GAP = 4  # pixels kept between two tags, so that they read as two


def _overlaps(a: Rect, b: Rect, gap: int = TAG_GAP) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def place_tag(size: tuple[int, int], box: Rect | None, frame: tuple[int, int], taken: list[Rect]) -> Rect:
    """Where a tag of ``size`` (width, height) goes: just above its box, else inside its top edge, else just below
    it (a classifier's, with no box, in the top-left corner); the first of those that lies inside the frame and
    clear of every tag already ``taken`` by TAG_GAP. When none is, the nearest free place further down, then up; a frame too
    crowded for any keeps the first candidate inside the frame."""
    tw, th = size
    w, h = frame
    x = 4 if box is None else max(0, min(box[0], w - tw))
    ys = [4] if box is None else [box[1] - th - 1, box[1] + 3, box[3] + 3]
    inside = [y for y in ys if 0 <= y and y + th <= h]
    for y in inside:
        rect = (x, y, x + tw, y + th)
        if not any(_overlaps(rect, t) for t in taken):
            return rect
    start = inside[0] if inside else max(0, min(ys[0], h - th))
    for y in [*range(start, h - th + 1, 2), *range(start, -1, -2)]:
        rect = (x, y, x + tw, y + th)
        if not any(_overlaps(rect, t) for t in taken):
            return rect
    return (x, start, x + tw, start + th)


@dataclass(frozen=True)
class Tag:
    """One result's drawing: its box (None: a classifier's top result), the tag's lines, colour and place."""

    box: Rect | None
    lines: tuple[str, ...]
    colour: tuple[int, int, int]
    rect: Rect
    thick: int  # the box's line width: 3 when flagged


def layout(message: dict[str, Any], width: int, height: int) -> list[Tag]:
    """Where ``message``'s results go on a canvas of ``width`` x ``height`` (already enlarged): each box, and
    its tag placed clear of the others (:func:`place_tag`)."""
    scale = font_scale(width)
    line_h = _line_height(scale)
    tags: list[Tag] = []
    taken: list[Rect] = []
    for i, item in enumerate(message.get("detections") or []):
        text, reason = describe(item)
        colour = UNKNOWN if item.get("label") == "unknown" else FLAGGED if reason else TRUSTED
        # each line measured once: OpenCV 5's getTextSize costs about 0.35 us a character, a quarter of draw()
        lines = [f"REVIEW ({reason}): {text}"] if reason else [text]
        widths = [_text_width(lines[0], scale)]
        if reason and widths[0] > width - 8:  # too wide for the frame: the reason on its own line
            lines = [f"REVIEW ({reason})", text]
            widths = [_text_width(line, scale) for line in lines]
        if "bbox" in item:  # normalised to the frame
            b = item["bbox"]
            box: Rect | None = tuple(int(round(v)) for v in (b["x_min"] * width, b["y_min"] * height,
                                                             b["x_max"] * width, b["y_max"] * height))
        elif i == 0:  # a classifier: its top result in the corner
            box = None
        else:
            continue
        rect = place_tag((max(widths) + 6, line_h * len(lines) + 2), box, (width, height), taken)
        taken.append(rect)
        tags.append(Tag(box, tuple(lines), colour, rect, 3 if reason else 2))
    return tags


def draw(image: np.ndarray, message: dict[str, Any]) -> np.ndarray:
    """A copy of ``image`` (BGR), enlarged when narrower than MIN_WIDTH, with ``message``'s results drawn on it
    (see the module's docstring): every box first, then every tag on top, each where it overlaps no other."""
    import cv2

    canvas = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    k = enlargement(canvas.shape[1])
    canvas = (cv2.resize(canvas, None, fx=k, fy=k, interpolation=cv2.INTER_NEAREST) if k > 1 else canvas.copy())
    h, w = canvas.shape[:2]
    scale = font_scale(w)
    line_h = _line_height(scale)
    tags = layout(message, w, h)
    for t in tags:
        if t.box is not None:
            cv2.rectangle(canvas, t.box[:2], t.box[2:], t.colour, t.thick)
    for t in tags:
        # a filled tag in the box's colour: readable on any background, and one text pass instead of the two an
        # outlined text takes (putText is most of draw()'s time)
        cv2.rectangle(canvas, t.rect[:2], (t.rect[2] - 1, t.rect[3] - 1), t.colour, cv2.FILLED)
        for n, line in enumerate(t.lines):
            cv2.putText(canvas, line, (t.rect[0] + 3, t.rect[1] + (n + 1) * line_h - 4), cv2.FONT_HERSHEY_SIMPLEX,
                        scale, TEXT_ON[t.colour], 1, cv2.LINE_AA)
    return canvas


def snapshot_jpeg(canvas: np.ndarray, max_width: int, quality: int) -> bytes:
    """A drawn frame as a small JPEG: scaled down to ``max_width`` pixels wide (never up)."""
    import cv2

    h, w = canvas.shape[:2]
    if w > max_width:
        canvas = cv2.resize(canvas, (max_width, max(1, round(h * max_width / w))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ConfigError("snapshot: OpenCV could not encode the frame as JPEG")
    return data.tobytes()
