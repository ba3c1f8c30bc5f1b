"""RGB corpora that `generate` reads: a folder tree, COCO, YOLO, a list of paths, pair
shards, a video, or a tracking layout (MOT, GOT-10k, LaSOT).

`discover_corpus` finds the input's kind; its listing then streams every input image
with a stable key, its path relative to the corpus root (which `export` mirrors) and the
labels that came with it, in its own format, and for the frames of a sequence (a video,
numbered frames, a tracking layout's sequence: `tirsynth.sequences`) its sequence and
frame number. Inputs that cannot be used become rejects
with a reason. `write_listing` streams the images still to do into Parquet files that the
generate pipeline reads a row group at a time, so no stage holds the corpus in memory.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tirsynth import sequences, shards, video
from tirsynth.config import CorpusKind
from tirsynth.containment import (
    NOT_UTF8,
    OUTSIDE,
    clean_relpath,
    inside,
    is_utf8,
    printable,
    relpath_inside,
    resolve,
    walk_files,
)
from tirsynth.layouts import IMAGE_SUFFIXES, make_key

COCO_PREFIX = "coco_"  # generate writes COCO input's json as coco_<name> beside its index
LISTING_CHUNK_ROWS = 65_536  # rows the listing holds in memory at a time
Reject = dict[str, str]  # key, path, reason


@dataclass(frozen=True)
class InputImage:
    key: str  # stable across runs, derived from `relpath`, no dots
    relpath: str  # path under the corpus root, '/'-separated
    path: str = ""  # the file to read ('' for pair shards)
    shard: str = ""  # pair shards: the shard holding the RGB (and the real TIR)
    labels: str = "{}"  # JSON: the labels that came with the image, in the input's format
    sequence: str | None = None  # frames of a sequence: its name (see tirsynth.sequences)
    frame: int | None = None  # and the frame's number in it


@dataclass(frozen=True)
class SequenceFile:
    """A tracking layout's label or metadata file, carried through unchanged."""

    relpath: str
    path: Path


@dataclass
class Corpus:
    kind: str
    root: Path
    # Lists the input again at each call: images and rejects, in a stable order.
    entries: Callable[[], Iterator[InputImage | Reject]]
    # COCO: json name -> path. Each is read when listed and when its copy is written, not
    # held for the run (COCO's train json is hundreds of MB of Python objects).
    coco_files: dict[str, Path] = field(default_factory=dict)
    # Tracking layouts: the sequences' label files, listed again at each call.
    sequence_files: Callable[[], Iterator[SequenceFile]] = lambda: iter(())

    def images(self) -> list[InputImage]:
        """Every image, keys made unique (`unique_key`): for corpora that fit in memory."""
        found = [e for e in self.entries() if isinstance(e, InputImage)]
        colliding = {key for key, n in Counter(i.key for i in found).items() if n > 1}
        return [unique_key(image, colliding) for image in found]


def discover_corpus(source: str | Path, kind: CorpusKind = "auto", split: str | None = None):
    """List the images of `source`.

    Args:
        source: a folder, a COCO or YOLO dataset root, a text file of image paths, or a
            pair-shard folder from `tirsynth ingest`.
        kind: force the input kind; auto detects it.
        split: pair shards only: take this split (default: all).

    Returns:
        A `Corpus` (COCO's json files are read here; everything else when listed).
    """
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"input {root} does not exist")
    kind = detect_kind(root) if kind == "auto" else kind
    if kind == "coco":
        coco_files = {path.name: path for path in _coco_jsons(root)}
        return Corpus(kind, root, lambda: _list_coco(root, coco_files), coco_files)
    if kind == "shards":
        _check_split(root, split)
        return Corpus(kind, root, lambda: _list_shards(root, split))
    if kind == "sequences":
        return Corpus(
            kind,
            root,
            lambda: (e for e in _list_tracking(root) if not isinstance(e, SequenceFile)),
            sequence_files=lambda: (e for e in _list_tracking(root) if isinstance(e, SequenceFile)),
        )  # fmt: skip
    if kind == "video":
        return Corpus(kind, root.parent, lambda: _video_frames(root.name, root))
    readers = {"folder": _list_folder, "yolo": _list_yolo, "list": _list_file}
    base = root.parent if kind == "list" else root
    return Corpus(kind, base, lambda: readers[kind](root))


def detect_kind(root: Path) -> str:
    if root.is_file():
        return "video" if video.is_video(root) else "list"
    if (root / shards.INDEX).exists():
        return "shards"
    if _coco_jsons(root):
        return "coco"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "yolo"
    if sequences.is_tracking_layout(root):
        return "sequences"
    return "folder"


def output_relpath(relpath: str) -> str:
    """Where `export` writes an input's TIR image: same folders and stem, as PNG."""
    return clean_relpath(f"{os.path.splitext(relpath)[0]}.png")


def _list_folder(root: Path) -> Iterator[InputImage | Reject]:
    """Images, and the frames of every video; a folder of numbered frames
    (`sequences.is_numbered_folder`) is a sequence, named by its path (the root's by its
    name)."""
    numbered = _FolderCache(root, sequences.is_numbered_folder)

    def image(rel: str, path: Path) -> InputImage:
        folder = os.path.dirname(rel)
        if not numbered(folder):
            return InputImage(_key(rel), rel, str(path))
        sequence, frame = folder or root.name, sequences.frame_number(rel)
        return InputImage(_key(rel), rel, str(path), sequence=sequence, frame=frame)

    def other(rel: str, path: Path) -> Iterator[Reject]:
        yield _reject(rel, path, "not an image file")

    return _walk_inputs(root, image, other)


def _list_tracking(root: Path) -> Iterator[InputImage | Reject | SequenceFile]:
    """A MOT, GOT-10k or LaSOT tree: every image is a frame of its sequence
    (`sequences.sequence_of`), every video a sequence of its own, every other file a
    sequence file carried through unchanged."""

    def image(rel: str, path: Path) -> InputImage:
        sequence, frame = sequences.sequence_of(rel) or root.name, sequences.frame_number(rel)
        return InputImage(_key(rel), rel, str(path), sequence=sequence, frame=frame)

    def other(rel: str, path: Path) -> Iterator[Reject | SequenceFile]:
        try:
            size = path.stat().st_size
        except OSError as error:
            yield _reject(rel, path, f"cannot read the sequence file: {error.strerror}")
            return
        if size > sequences.MAX_SEQUENCE_FILE_BYTES:
            yield _reject(rel, path, f"sequence file too large to carry ({size} bytes)")
        else:
            yield SequenceFile(rel, path)

    return _walk_inputs(root, image, other)


def _walk_inputs(
    root: Path,
    image: Callable[[str, Path], InputImage],
    other: Callable[[str, Path], Iterator[Any]],
) -> Iterator[Any]:
    """Every file under `root` in `walk_files` order: a reject for one that cannot be
    read, the frames of a video, `image(rel, path)` for an image, `other(rel, path)`'s
    entries for anything else."""
    for rel, problem in walk_files(root):
        path = root / rel
        if problem:
            yield _reject(rel, path, problem)
        elif video.is_video(rel):
            yield from _video_frames(rel, path)
        elif Path(rel).suffix.lower() in IMAGE_SUFFIXES:
            yield image(rel, path)
        else:
            yield from other(rel, path)


def _video_frames(rel: str, path: Path) -> Iterator[InputImage | Reject]:
    """One entry per frame of a video: `<video path without suffix>/<frame>.png`, frames
    counted from 1, the video's frame rate in the labels (for `export --video`). A video
    cut short gives its frames and a reject for each frame its index promises beyond."""
    try:
        info = video.probe(path)
    except ValueError as error:
        yield _reject(rel, path, str(error))
        return
    if info.frames == 0 and not info.declared:
        yield _reject(rel, path, "video without frames")
        return
    sequence = os.path.splitext(rel)[0]
    labels = json.dumps({"video": rel, "frame_rate": str(info.rate)})
    for number in range(1, max(info.frames, info.declared) + 1):
        frame_rel = f"{sequence}/{number:06d}.png"
        if number > info.frames:
            reason = f"video cut short: {info.frames} of its {info.declared} frames present"
            yield {**_reject(frame_rel, path, reason), "relpath": frame_rel,
                   "sequence": sequence, "frame": str(number)}  # fmt: skip
            continue
        yield InputImage(
            _key(frame_rel), frame_rel, video.frame_path(path, number - 1), labels=labels,
            sequence=sequence, frame=number,
        )  # fmt: skip


class _FolderCache:
    """`test(names of the folder's files)` for the folder being walked (walk_files lists
    a folder's files together, so one folder is kept at a time)."""

    def __init__(self, root: Path, test: Callable[[list[str]], bool]) -> None:
        self.root, self.test, self.folder, self.result = root, test, None, False

    def __call__(self, folder: str) -> bool:
        if folder != self.folder:
            try:
                with os.scandir(self.root / folder) as entries:
                    names = [e.name for e in entries if not e.is_dir()]
            except OSError:
                names = []
            self.folder, self.result = folder, self.test(names)
        return self.result


def _list_file(list_file: Path) -> Iterator[InputImage | Reject]:
    """A text file of image paths, relative to its folder or absolute: the user's own
    selection, like paths on a command line, so it may name files anywhere. Each output's
    path is the file's path under the list's folder, or else its whole normalised path
    (`/data/a.jpg` exports as `data/a.png`), so two files never share an output."""
    base = list_file.parent
    resolved_base = resolve(base)
    with list_file.open(encoding="utf-8", errors="surrogateescape") as lines:
        for number, line in enumerate((line.strip() for line in lines), start=1):
            if not line or line.startswith("#"):
                continue
            if not is_utf8(line):
                yield _reject(line, list_file, f"line {number}: {NOT_UTF8}")
                continue
            path = Path(os.path.normpath(base / line))
            rel = relpath_inside(base, line, resolved_base) or clean_relpath(str(path))
            if not path.is_file():
                yield _reject(rel, path, "file listed but missing")
            else:
                yield InputImage(_key(rel), rel, str(path))


def _list_yolo(root: Path) -> Iterator[InputImage | Reject]:
    """YOLO layout: images/<rel>.<ext> with labels/<rel>.txt (no file: no objects)."""
    label_root = root / "labels"
    for rel, problem in walk_files(root / "images", root):
        path = root / "images" / rel
        if problem:
            yield _reject(f"images/{rel}", path, problem)
            continue
        if Path(rel).suffix.lower() not in IMAGE_SUFFIXES:
            yield _reject(f"images/{rel}", path, "not an image file")
            continue
        label_rel = f"labels/{os.path.splitext(rel)[0]}.txt"
        text, problem = _read_label_file(root, label_rel)
        if problem:
            yield _reject(f"images/{rel}", root / label_rel, problem)
            continue
        labels = {"yolo": text, "label_file": label_rel}
        yield InputImage(
            _key(f"images/{rel}"), f"images/{rel}", str(path), labels=json.dumps(labels)
        )
    # Label files without an image, one folder of images in memory at a time.
    stems_in: dict[str, set[str]] = {}
    for rel, problem in walk_files(label_root, root):
        if not rel:  # no labels/ folder (or one that leads outside: each image says so)
            continue
        folder, name = os.path.split(rel)
        if folder not in stems_in:
            stems_in = {folder: _image_stems(root / "images" / folder)}
        if os.path.splitext(name)[0] in stems_in[folder]:
            continue  # its image's entry took it, or named why it could not
        if problem or name.endswith(".txt"):
            reason = problem or "labels without an image"
            yield _reject(f"labels/{rel}", label_root / rel, reason)


def _read_label_file(root: Path, label_rel: str) -> tuple[str, str | None]:
    """(text of a YOLO label file, '' when there is none; None or why it cannot be used)."""
    path = root / label_rel
    if not os.path.lexists(path):
        return "", None
    if not inside(root, path):
        return "", f"label file: {OUTSIDE}"
    try:
        return path.read_text(encoding="utf-8"), None
    except UnicodeDecodeError:
        return "", "label file is not UTF-8 text"
    except OSError as error:
        return "", f"cannot read the label file: {error.strerror or error}"


def _image_stems(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {
            os.path.splitext(e.name)[0]
            for e in entries
            if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and not e.is_dir()
        }


def _list_coco(root: Path, coco_files: dict[str, Path]) -> Iterator[InputImage | Reject]:
    """COCO: annotations/*.json (instances) and the images they name, wherever they sit
    inside the root."""
    resolved_root = resolve(root)
    for name, json_path in coco_files.items():
        coco = json.loads(json_path.read_text())
        by_image: dict[Any, list] = {}
        for annotation in coco.get("annotations", []):
            if isinstance(annotation, dict):
                by_image.setdefault(annotation.get("image_id"), []).append(annotation)
        for number, entry in enumerate(coco["images"]):
            file_name = entry.get("file_name") if isinstance(entry, dict) else None
            if not isinstance(file_name, str) or not file_name.strip():
                where = f"{name} images[{number}]"
                yield _reject(where, json_path, "COCO image entry without a file_name")
                continue
            if not is_utf8(file_name):
                yield _reject(file_name, Path(file_name), NOT_UTF8)
                continue
            path, rel = coco_image_path(root, name, entry, resolved_root)
            if path is None:
                yield _reject(file_name, root / file_name, rel)
                continue
            annotations = by_image.get(entry.get("id"), [])
            labels = {"coco": {"file": name, "image": entry, "annotations": annotations}}
            yield InputImage(_key(rel), rel, str(path), labels=json.dumps(labels))


def coco_image_path(
    root: Path, json_name: str, entry: dict, resolved_root: Path | None = None
) -> tuple[Path | None, str]:
    """(the file a COCO json's image entry names, or None; its clean path under the root,
    or why it was not taken).

    The name is looked for in the root, the json's subset folder and images/; a name that
    leads outside the root (`..`, an absolute path, a link) is never opened."""
    file_name = entry["file_name"].replace("\\", "/")
    subset = Path(json_name).stem.removeprefix("instances_")
    if os.path.isabs(file_name):
        candidates = [file_name]
    else:
        folders = ("", subset, "images", f"images/{subset}")
        candidates = [os.path.join(folder, file_name) for folder in folders]
    reason = "image named in COCO json not found"
    for candidate in candidates:
        rel = relpath_inside(root, candidate, resolved_root)
        if rel is None:
            reason = OUTSIDE
        elif (root / rel).is_file():
            return root / rel, rel
    return None, reason


def _check_split(root: Path, split: str | None) -> None:
    splits = {row["split"] for row in shards.read_index(root, ["split"])}
    if not splits or (split is not None and split not in splits):
        raise ValueError(f"{root}: no pair samples" + (f" in split {split!r}" if split else ""))


def _list_shards(root: Path, split: str | None) -> Iterator[InputImage]:
    columns = ["key", "split", "shard", "dataset", "daynight"]
    for row in shards.read_index(root, columns):
        if split is not None and row["split"] != split:
            continue
        labels = {"dataset": row["dataset"], "daynight": row["daynight"], "split": row["split"]}
        yield InputImage(
            row["key"], f"{row['split']}/{row['key']}.png", shard=row["shard"],
            labels=json.dumps(labels),
        )  # fmt: skip


def _coco_jsons(root: Path) -> list[Path]:
    candidates = sorted((root / "annotations").glob("*.json")) if root.is_dir() else []
    found = []
    for path in candidates:
        with path.open() as handle:
            head = handle.read(1 << 16)
        if '"images"' in head or path.name.startswith("instances_"):
            found.append(path)
    return found


def _key(relpath: str) -> str:
    return make_key("img", os.path.splitext(relpath)[0]).removeprefix("img_")


def _reject(rel: str, path: Path, reason: str) -> dict[str, str]:
    return {"key": _key(printable(rel)), "path": printable(str(path)), "reason": reason}


def unique_key(image: InputImage, colliding: set[str]) -> InputImage:
    """a.jpg and a.png share a stem: each image whose key is in `colliding` gets a key from
    its full path."""
    if image.key not in colliding:
        return image
    return InputImage(
        make_key("img", image.relpath).removeprefix("img_"),
        image.relpath,
        image.path,
        image.shard,
        image.labels,
        image.sequence,
        image.frame,
    )


LISTING_SCHEMA = pa.schema(
    [(name, pa.string())
     for name in ("key", "relpath", "path", "shard", "labels", "source", "input_path",
                  "sequence")]
    + [("frame", pa.int64())]
)  # fmt: skip


@dataclass(frozen=True)
class Listing:
    """The images a run still has to do, as Parquet files of `file_groups` row groups each
    (the last file may hold fewer); a row group is one CPU task's images."""

    folder: Path
    groups: int
    file_groups: int
    images: int
    rejects: list[Reject]  # every reject found while listing


def read_listing_group(folder: str | Path, file_groups: int, group: int) -> dict[str, list]:
    """Row group number `group` (counted over the whole listing), column by column."""
    path = Path(folder) / _listing_file(group // file_groups)
    with open(path, "rb") as handle:
        return pq.ParquetFile(handle).read_row_group(group % file_groups).to_pydict()


def _listing_file(number: int) -> str:
    return f"part-{number:06d}.parquet"


def write_listing(
    corpus: Corpus, folder: Path, done: pa.Array, group_rows: int, file_groups: int = 64
) -> Listing:
    """Stream the corpus's images whose keys are not in `done` to Parquet files in `folder`,
    in row groups of `group_rows` images.

    Three passes over chunks of LISTING_CHUNK_ROWS, so that memory holds one chunk and the
    keys (as Arrow strings) rather than the corpus: list to raw chunks; find the keys that
    collide; give those their full-path keys (`unique_key`), drop what is done and cut the
    rest into files of `file_groups` row groups. Rejects (not an image, a missing file) are
    returned, all of them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    raw, rejects, chunk = [], [], []
    for entry in corpus.entries():
        if not isinstance(entry, InputImage):
            rejects.append(entry)
            continue
        chunk.append(_listing_row(entry))
        if len(chunk) == LISTING_CHUNK_ROWS:
            raw.append(_write_raw(folder, len(raw), chunk))
            chunk = []
    if chunk or not raw:
        raw.append(_write_raw(folder, len(raw), chunk))
    keys = pa.chunked_array([pq.read_table(path, columns=["key"])["key"] for path in raw])
    counts = pc.value_counts(keys)
    colliding = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    writer = _ListingWriter(folder, file_groups, group_rows)
    for path in raw:
        table = pq.read_table(path)
        if len(colliding) and pc.any(pc.is_in(table["key"], colliding)).as_py():
            names = set(colliding.to_pylist())
            rows = [_listing_row(unique_key(_input_image(row), names)) for row in table.to_pylist()]
            table = pa.Table.from_pylist(rows, LISTING_SCHEMA)
        writer.add(table.filter(pc.invert(pc.is_in(table["key"], done))))
        path.unlink()
    writer.close()
    return Listing(folder, writer.groups, file_groups, writer.rows, rejects)


class _ListingWriter:
    """Cuts a stream of tables into files of `file_groups` groups of `group_rows` rows."""

    def __init__(self, folder: Path, file_groups: int, group_rows: int) -> None:
        self.folder, self.group_rows = folder, group_rows
        self.file_rows = file_groups * group_rows
        self.pending: list[pa.Table] = []
        self.rows = self.files = self.groups = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        buffered = pa.concat_tables(self.pending)
        while len(buffered) >= self.file_rows:
            self._write(buffered.slice(0, self.file_rows))
            buffered = buffered.slice(self.file_rows)
        self.pending = [buffered]

    def close(self) -> None:
        buffered = pa.concat_tables(self.pending)
        if len(buffered):
            self._write(buffered)

    def _write(self, table: pa.Table) -> None:
        path = self.folder / _listing_file(self.files)
        shards.write_table(path, table, row_group_size=self.group_rows)
        self.groups += -(-len(table) // self.group_rows)
        self.rows += len(table)
        self.files += 1


def _write_raw(folder: Path, number: int, rows: list[dict[str, str]]) -> Path:
    path = folder / f"raw-{number:06d}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, LISTING_SCHEMA), path)
    return path


def _listing_row(image: InputImage) -> dict[str, str]:
    return {
        "key": image.key,
        "relpath": image.relpath,
        "path": image.path,
        "shard": image.shard,
        "labels": image.labels,
        "source": image.path or f"{image.shard}:{image.key}",
        "input_path": image.path or image.shard,
        "sequence": image.sequence,
        "frame": image.frame,
    }


def _input_image(row: dict[str, Any]) -> InputImage:
    return InputImage(
        row["key"], row["relpath"], row["path"], row["shard"], row["labels"], row["sequence"],
        row["frame"],
    )  # fmt: skip
