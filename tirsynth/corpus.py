"""RGB corpora that `generate` reads: a folder tree, COCO, YOLO, a list of paths, or pair shards.

`discover_corpus` lists every input image with a stable key, its path relative to the
corpus root (which `export` mirrors) and the labels that came with it, in its own format.
Inputs that cannot be used become rejects with a reason.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tirsynth import shards
from tirsynth.config import CorpusKind
from tirsynth.layouts import IMAGE_SUFFIXES, make_key

COCO_PREFIX = "coco_"  # generate writes COCO input's json as coco_<name> beside its index


@dataclass(frozen=True)
class InputImage:
    key: str  # stable across runs, derived from `relpath`, no dots
    relpath: str  # path under the corpus root, '/'-separated
    path: str = ""  # the file to read ('' for pair shards)
    shard: str = ""  # pair shards: the shard holding the RGB (and the real TIR)
    labels: str = "{}"  # JSON: the labels that came with the image, in the input's format


@dataclass
class Corpus:
    kind: str
    root: Path
    images: list[InputImage]
    rejects: list[dict[str, str]] = field(default_factory=list)  # key, path, reason
    coco_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> instances


def discover_corpus(source: str | Path, kind: CorpusKind = "auto", split: str | None = None):
    """List the images of `source`.

    Args:
        source: a folder, a COCO or YOLO dataset root, a text file of image paths, or a
            pair-shard folder from `tirsynth ingest`.
        kind: force the input kind; auto detects it.
        split: pair shards only: take this split (default: all).

    Returns:
        A `Corpus`.
    """
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"input {root} does not exist")
    kind = detect_kind(root) if kind == "auto" else kind
    readers = {
        "folder": _read_folder,
        "coco": _read_coco,
        "yolo": _read_yolo,
        "list": _read_list,
        "shards": lambda r: _read_shards(r, split),
    }
    corpus = readers[kind](root)
    _check_unique_keys(corpus)
    return corpus


def detect_kind(root: Path) -> str:
    if root.is_file():
        return "list"
    if (root / shards.INDEX).exists():
        return "shards"
    if _coco_jsons(root):
        return "coco"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "yolo"
    return "folder"


def output_relpath(relpath: str) -> str:
    """Where `export` writes an input's TIR image: same folders and stem, as PNG."""
    return f"{os.path.splitext(relpath)[0]}.png"


def _read_folder(root: Path) -> Corpus:
    images, rejects = [], []
    for rel in _walk(root):
        path = root / rel
        if Path(rel).suffix.lower() in IMAGE_SUFFIXES:
            images.append(InputImage(_key(rel), rel, str(path)))
        else:
            rejects.append(_reject(rel, path, "not an image file"))
    return Corpus("folder", root, images, rejects)


def _read_list(list_file: Path) -> Corpus:
    base = list_file.parent
    images, rejects = [], []
    lines = [line.strip() for line in list_file.read_text().splitlines()]
    for line in (line for line in lines if line and not line.startswith("#")):
        path = Path(line) if Path(line).is_absolute() else base / line
        rel = line.lstrip("/") if Path(line).is_absolute() else line
        rel = rel.replace(os.sep, "/")
        if not path.is_file():
            rejects.append(_reject(rel, path, "file listed but missing"))
        else:
            images.append(InputImage(_key(rel), rel, str(path)))
    return Corpus("list", base, images, rejects)


def _read_yolo(root: Path) -> Corpus:
    """YOLO layout: images/<rel>.<ext> with labels/<rel>.txt (no file: no objects)."""
    images, rejects = [], []
    label_root = root / "labels"
    for rel in _walk(root / "images"):
        path = root / "images" / rel
        if Path(rel).suffix.lower() not in IMAGE_SUFFIXES:
            rejects.append(_reject(f"images/{rel}", path, "not an image file"))
            continue
        label_file = label_root / f"{os.path.splitext(rel)[0]}.txt"
        text = label_file.read_text() if label_file.is_file() else ""
        labels = {"yolo": text, "label_file": f"labels/{os.path.splitext(rel)[0]}.txt"}
        images.append(
            InputImage(_key(f"images/{rel}"), f"images/{rel}", str(path), labels=json.dumps(labels))
        )
    image_stems = {os.path.splitext(i.relpath[len("images/") :])[0] for i in images}
    for rel in _walk(label_root):
        if rel.endswith(".txt") and os.path.splitext(rel)[0] not in image_stems:
            rejects.append(_reject(f"labels/{rel}", label_root / rel, "labels without an image"))
    return Corpus("yolo", root, images, rejects)


def _read_coco(root: Path) -> Corpus:
    """COCO: annotations/*.json (instances) and the images they name, wherever they sit."""
    images, rejects, coco_files = [], [], {}
    for json_path in _coco_jsons(root):
        coco = json.loads(json_path.read_text())
        coco_files[json_path.name] = coco
        by_image: dict[Any, list] = {}
        for annotation in coco.get("annotations", []):
            by_image.setdefault(annotation["image_id"], []).append(annotation)
        subset = json_path.stem.removeprefix("instances_")
        for entry in coco["images"]:
            path = _find_coco_image(root, subset, entry["file_name"])
            rel = path.relative_to(root).as_posix() if path else entry["file_name"]
            labels = {
                "coco": {
                    "file": json_path.name,
                    "image": entry,
                    "annotations": by_image.get(entry["id"], []),
                }
            }
            if path is None:
                rejects.append(_reject(rel, root / rel, "image named in COCO json not found"))
                continue
            images.append(InputImage(_key(rel), rel, str(path), labels=json.dumps(labels)))
    return Corpus("coco", root, images, rejects, coco_files)


def _read_shards(root: Path, split: str | None) -> Corpus:
    rows = [r for r in shards.read_index(root) if split is None or r["split"] == split]
    if not rows:
        raise ValueError(f"{root}: no pair samples" + (f" in split {split!r}" if split else ""))
    images = [
        InputImage(
            row["key"],
            f"{row['split']}/{row['key']}.png",
            shard=row["shard"],
            labels=json.dumps(
                {"dataset": row["dataset"], "daynight": row["daynight"], "split": row["split"]}
            ),
        )
        for row in rows
    ]
    return Corpus("shards", root, images)


def _coco_jsons(root: Path) -> list[Path]:
    candidates = sorted((root / "annotations").glob("*.json")) if root.is_dir() else []
    found = []
    for path in candidates:
        with path.open() as handle:
            head = handle.read(1 << 16)
        if '"images"' in head or path.name.startswith("instances_"):
            found.append(path)
    return found


def _find_coco_image(root: Path, subset: str, file_name: str) -> Path | None:
    for folder in (root, root / subset, root / "images", root / "images" / subset):
        if (folder / file_name).is_file():
            return folder / file_name
    return None


def _walk(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, name), folder))
    return [rel.replace(os.sep, "/") for rel in found]


def _key(relpath: str) -> str:
    return make_key("img", os.path.splitext(relpath)[0]).removeprefix("img_")


def _reject(rel: str, path: Path, reason: str) -> dict[str, str]:
    return {"key": _key(rel), "path": str(path), "reason": reason}


def _check_unique_keys(corpus: Corpus) -> None:
    # a.jpg and a.png share a stem: give each colliding image a key from its full path.
    counts = Counter(image.key for image in corpus.images)
    if all(count == 1 for count in counts.values()):
        return
    corpus.images = [
        image
        if counts[image.key] == 1
        else InputImage(
            make_key("img", image.relpath).removeprefix("img_"),
            image.relpath,
            image.path,
            image.shard,
            image.labels,
        )
        for image in corpus.images
    ]
