"""Generated TIR shards in; a plain folder tree mirroring the input, labels beside, out.

For tools that want files: each output is written as `<input relative path>.png`
(8-bit single-channel), with the labels in the input's own format (COCO json in
annotations/, YOLO txt in labels/, a tracking layout's label files in their sequence
folders). Every target is built from a cleaned relative path and checked to lie inside
`to`, whatever the shards say (`containment.target_inside`).

Sequences (`tirsynth.sequences`) come out as a tracker's data loader read them: the same
sequence folders and frame numbers (a video's frames as `<video path without suffix>/
000001.png`, ...), the label files byte for byte, a MOT `seqinfo.ini` with `imExt=.png`.
A frame that `generate` rejected becomes a copy of the nearest generated frame of its
sequence (the earlier one on a tie), so that no frame number is missing; `ExportResult`
counts them. On request each sequence is also written as one video beside its folder.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from tqdm import tqdm

from tirsynth import sequences, shards, video
from tirsynth.containment import inside, target_inside
from tirsynth.corpus import COCO_PREFIX, output_relpath
from tirsynth.shards import atomic_output

SEQUENCE_SCHEMA = pa.schema(
    [("sequence", pa.string()), ("frame", pa.int64()), ("relpath", pa.string())]
)


@dataclass(frozen=True)
class ExportResult:
    images: int  # generated outputs written
    filled_frames: int  # rejected frames of sequences written as their nearest neighbour
    empty_sequences: list[str]  # sequences with no generated frame: nothing to fill from
    videos: int  # sequence videos written


def run(
    generated: str | Path,
    to: str | Path,
    progress: bool = True,
    video_quality: int | None | bool = False,
) -> ExportResult:
    """Write every output of a `tirsynth generate` folder under `to`.

    Args:
        generated: the generate run's folder.
        to: the target folder.
        progress: show a progress bar.
        video_quality: False: frames only. None: also one lossless video per sequence
            (`.mkv`, FFV1). An int: also one H.264 `.mp4` per sequence at that CRF.
    """
    generated, to = Path(generated), Path(to)
    manifest = shards.read_manifest(generated)
    if manifest is None or manifest.get("stage") != "generate":
        raise ValueError(f"{generated} is not the output of `tirsynth generate`")
    if manifest["status"] != "complete":
        raise ValueError(f"{generated}: generation is incomplete; run it again to finish it")
    index = shards.read_arrow(
        generated / shards.INDEX, ["shard", "shard_bytes", *SEQUENCE_SCHEMA.names]
    )
    damaged = shards.damaged_shards(generated, index)
    if damaged:  # found before anything is written, as a damaged rejects fragment is
        raise shards.DamagedFile(
            f"{generated}: {len(damaged)} shards missing or not the size committed "
            f"({', '.join(damaged[:3])}); export wrote nothing; run the same generate again "
            "to redo them"
        )
    rejected_frames = _sequence_frames(shards.read_arrow(generated / shards.REJECTS))
    written, video_rates = _write_outputs(generated, to, index["shard"], progress)
    _write_labels(generated, to, manifest)
    frames = _sequence_frames(index)
    filled, empty = _fill_rejected_frames(to, frames, rejected_frames)
    videos = 0
    if video_quality is not False:
        rates = {**_seqinfo_rates(generated, frames), **video_rates}
        every_frame = pa.concat_tables([frames, filled])
        every_frame = every_frame.sort_by([("sequence", "ascending"), ("frame", "ascending")])
        videos = _write_videos(to, every_frame, rates, video_quality, progress)
    return ExportResult(written, len(filled), empty, videos)


def _write_outputs(
    generated: Path, to: Path, shard_column: pa.ChunkedArray, progress: bool
) -> tuple[int, dict[str, Fraction]]:
    """(outputs written, the frame rate of each sequence that was a video)."""
    written, rates = 0, {}
    bar = tqdm(total=len(shard_column), disable=not progress, unit="img", desc="export")
    for shard in sorted(shard_column.unique().to_pylist()):
        for sample in _samples(generated / shard):
            record = json.loads(sample["json"])
            _write(target_inside(to, output_relpath(record["relpath"])), sample["tir.png"])
            if "frame_rate" in record["labels"]:
                rates[record["sequence"]] = Fraction(record["labels"]["frame_rate"])
            yolo = record["labels"].get("yolo")
            if yolo is not None:
                _write(target_inside(to, record["labels"]["label_file"]), yolo.encode())
            written += 1
            bar.update(1)
    bar.close()
    return written, rates


def _write_labels(generated: Path, to: Path, manifest: dict) -> None:
    for coco_file in sorted(generated.glob(f"{COCO_PREFIX}*.json")):
        target = target_inside(to, f"annotations/{coco_file.name.removeprefix(COCO_PREFIX)}")
        _write(target, coco_file.read_bytes())
    if manifest["input_kind"] == "yolo":
        source = Path(manifest["input"])
        for dataset_yaml in sorted(source.glob("*.yaml")):
            if inside(source, dataset_yaml):  # a link to a file elsewhere is not copied out
                _write(target_inside(to, dataset_yaml.name), dataset_yaml.read_bytes())
    copies = generated / sequences.SEQUENCE_FILES
    for path in sorted(copies.rglob("*")) if copies.is_dir() else ():
        if path.is_file() and not path.is_symlink():
            rel = path.relative_to(copies).as_posix()
            data = path.read_bytes()
            if path.name == "seqinfo.ini":  # the frames are PNG now
                data = sequences.set_image_extension(data, ".png")
            _write(target_inside(to, rel), data)


def _sequence_frames(table: pa.Table) -> pa.Table:
    """sequence, frame, relpath of the rows that are frames of a sequence, sorted."""
    if not set(SEQUENCE_SCHEMA.names) <= set(table.column_names):  # written before sequences
        return SEQUENCE_SCHEMA.empty_table()
    frames = table.select(SEQUENCE_SCHEMA.names)
    frames = frames.set_column(1, "frame", pc.cast(frames["frame"], pa.int64()))
    frames = frames.filter(pc.and_(pc.is_valid(frames["sequence"]), pc.is_valid(frames["frame"])))
    frames = frames.cast(SEQUENCE_SCHEMA)
    return frames.sort_by([("sequence", "ascending"), ("frame", "ascending")])


def _by_sequence(frames: pa.Table):
    """(sequence, its rows) for each sequence of a table sorted by sequence."""
    names = frames["sequence"].to_numpy(zero_copy_only=False)
    if not len(names):
        return
    starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]])
    for start, stop in zip(starts, [*starts[1:], len(names)], strict=True):
        yield str(names[start]), frames.slice(start, stop - start)


def _fill_rejected_frames(
    to: Path, frames: pa.Table, rejected: pa.Table
) -> tuple[pa.Table, list[str]]:
    """Write each rejected frame of a sequence as a copy of its nearest generated frame.

    Returns:
        (sequence, frame, relpath of the frames filled; the sequences with no generated
        frame to fill from).
    """
    generated = dict(_by_sequence(frames))
    filled, empty = [], []
    for sequence, rows in _by_sequence(rejected):
        done = generated.get(sequence)
        if done is None:
            empty.append(sequence)
            continue
        numbers = done["frame"].to_numpy()
        for row in rows.to_pylist():
            nearest = int(np.argmin(np.abs(numbers - row["frame"])))  # the earlier on a tie
            source = target_inside(to, output_relpath(done["relpath"][nearest].as_py()))
            _write(target_inside(to, output_relpath(row["relpath"])), source.read_bytes())
            filled.append(row)
    return pa.Table.from_pylist(filled, SEQUENCE_SCHEMA), empty


def _write_videos(
    to: Path, frames: pa.Table, rates: dict[str, Fraction], quality: int | None, progress: bool
) -> int:
    """One video per sequence, `<sequence>.mkv` (lossless) or `.mp4`, from the exported
    frames in frame order."""
    written = 0
    for sequence, rows in tqdm(list(_by_sequence(frames)), disable=not progress, desc="videos"):
        target = target_inside(to, sequence + video.video_suffix(quality))
        paths = [target_inside(to, output_relpath(r)) for r in rows["relpath"].to_pylist()]
        rate = rates.get(sequence, sequences.DEFAULT_FRAME_RATE)
        video.write_video((Image.open(path) for path in paths), target, rate, quality)
        written += 1
    return written


def _seqinfo_rates(generated: Path, frames: pa.Table) -> dict[str, Fraction]:
    """The frame rate in each sequence's `seqinfo.ini` (MOT), where there is one."""
    rates = {}
    copies = generated / sequences.SEQUENCE_FILES
    for sequence, _ in _by_sequence(frames):
        seqinfo = copies / sequence / "seqinfo.ini"
        if seqinfo.is_file() and inside(copies, seqinfo):
            rate = sequences.frame_rate_of(seqinfo.read_bytes())
            if rate:
                rates[sequence] = rate
    return rates


def _samples(shard: Path):
    try:
        yield from shards.read_shard(shard)
    except (tarfile.TarError, ValueError, KeyError, EOFError) as error:
        raise shards.damaged(shard, "damaged tar", error) from error


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, durable=False) as handle:
        handle.write(data)
