"""Image sequences for trackers: video files, folders of numbered frames, and the MOT
Challenge and GOT-10k / LaSOT layouts.

Every frame of a sequence carries its sequence (the video's path without its suffix, or
the sequence folder's path, under the input root) and its frame number: for a video, its
position counted from 1 (as `ffmpeg -i clip.mp4 %06d.png` names frames and MOT labels
count them); for image frames, the number in the file name. The label files of a tracking
layout (`gt/gt.txt`, `det/det.txt`, `seqinfo.ini`, `groundtruth.txt`, ...) are "sequence
files": `generate` keeps a copy in its output and `export` writes them back unchanged,
except the image extension in a `seqinfo.ini`, which follows the exported frames.
"""

from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path, PurePosixPath

from tirsynth.layouts import IMAGE_SUFFIXES

# Folders that hold a sequence's frames: MOT's img1, LaSOT's img; the sequence is the
# folder above. Elsewhere (GOT-10k, numbered frames) the frames' own folder is the sequence.
FRAME_FOLDERS = {"img1", "img", "imgs"}
# Files whose presence one or two levels down marks a tracking layout.
TRACKING_MARKERS = ("seqinfo.ini", "gt/gt.txt", "groundtruth.txt", "groundtruth_rect.txt")
SEQUENCE_FILES = "sequence_files"  # generate's copy of the input's sequence files
MAX_SEQUENCE_FILE_BYTES = 256 << 20
DEFAULT_FRAME_RATE = Fraction(30)
_TRAILING_NUMBER = re.compile(r"(\d+)$")
_IMAGE_EXTENSION = re.compile(rb"(?im)^(\s*imExt\s*=\s*)(\S+)")
_FRAME_RATE = re.compile(rb"(?im)^\s*frameRate\s*=\s*([0-9.]+)")


def is_tracking_layout(root: Path, depth: int = 3) -> bool:
    """A MOT, GOT-10k or LaSOT tree: a marker file in the folder itself (one sequence)
    or in a sequence folder one to three levels down (`<seq>/`, `train/<seq>/`,
    `<category>/<seq>/`...). Folders are listed breadth first, each once, and the search
    stops at the level of the first marker: a large image tree that is no tracking layout
    costs one listing of each folder down to depth 2."""
    if any((root / marker).is_file() for marker in TRACKING_MARKERS):
        return True  # one sequence's own folder
    level = [root]
    for _ in range(depth):
        below = []
        for folder in level:
            try:
                with os.scandir(folder) as entries:
                    below += [
                        Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")
                    ]
            except OSError:
                continue
        if any((folder / marker).is_file() for folder in below for marker in TRACKING_MARKERS):
            return True
        level = below
    return False


def frame_number(relpath: str) -> int | None:
    """The number a frame's file name ends in (`000042.jpg` -> 42), or None."""
    match = _TRAILING_NUMBER.search(PurePosixPath(relpath).stem)
    return int(match.group(1)) if match else None


def sequence_of(relpath: str) -> str:
    """The sequence a frame in a tracking layout belongs to: its folder, or the one above
    for a frame folder (`MOT17-02/img1/000001.jpg` -> `MOT17-02`); '' for the root (the
    caller names it after the root folder)."""
    folder = PurePosixPath(relpath).parent
    if folder.name in FRAME_FOLDERS:
        folder = folder.parent
    return "" if str(folder) == "." else str(folder)


def is_numbered_folder(names: list[str]) -> bool:
    """Whether a folder's image file names are the frames of one sequence: two or more,
    each ending in a distinct number, the numbers dense (at most half of the range
    missing). COCO's image ids are numbers too, but far apart."""
    numbers = [frame_number(name) for name in names if _is_image(name)]
    if len(numbers) < 2 or None in numbers or len(set(numbers)) < len(numbers):
        return False
    return max(numbers) - min(numbers) + 1 <= 2 * len(numbers)


def set_image_extension(seqinfo: bytes, suffix: str) -> bytes:
    """A MOT `seqinfo.ini` with `imExt` set to `suffix`, every other byte kept."""
    return _IMAGE_EXTENSION.sub(lambda m: m.group(1) + suffix.encode(), seqinfo)


def frame_rate_of(seqinfo: bytes) -> Fraction | None:
    match = _FRAME_RATE.search(seqinfo)
    try:
        rate = Fraction(match.group(1).decode()) if match else None
    except (ValueError, ZeroDivisionError):
        return None
    return rate if rate and rate > 0 else None


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES
