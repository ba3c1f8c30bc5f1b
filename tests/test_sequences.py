"""Sequences through generate and export: MOT, GOT-10k and LaSOT trees, numbered frames
and videos come back in their own layout, frame for frame, labels byte for byte."""

import configparser
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_video
from PIL import Image
from test_generate import generate_cfg

from tirsynth import corpus, export, folders, generate, sequences, shards, temporal, video
from tirsynth.cli import cli

SEQINFO = (
    b"[Sequence]\r\nname={name}\r\nimDir=img1\r\nframeRate=25\r\nseqLength=6\r\n"
    b"imWidth=64\r\nimHeight=48\r\nimExt=.jpg\r\n"
)


def write_frame(path: Path, seed: int, size=(64, 48)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_mot(root: Path) -> dict[str, bytes]:
    """Two MOT sequences under train/, six frames each; frame 4 of the second is broken.
    Returns every label file's bytes by path."""
    labels = {}
    for number, name in enumerate(("MOT-01", "MOT-02")):
        seq = root / "train" / name
        for frame in range(1, 7):
            write_frame(seq / "img1" / f"{frame:06d}.jpg", 10 * number + frame)
        labels[f"train/{name}/gt/gt.txt"] = b"1,1,10,10,20,20,1,1,1.0\r\n2,1,11,10,20,20,1,1,1\n"
        labels[f"train/{name}/det/det.txt"] = b"1,-1,10,10,20,20,0.93\n"
        labels[f"train/{name}/seqinfo.ini"] = SEQINFO.replace(b"{name}", name.encode())
    (root / "train" / "MOT-02" / "img1" / "000004.jpg").write_bytes(b"not a jpeg")
    for rel, data in labels.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return labels


def test_frame_numbers_sequence_names_and_numbered_folders():
    assert sequences.frame_number("a/img1/000042.jpg") == 42
    assert sequences.frame_number("a/frame_7.png") == 7
    assert sequences.frame_number("a/cover.jpg") is None
    assert sequences.sequence_of("train/MOT17-02/img1/000001.jpg") == "train/MOT17-02"
    assert sequences.sequence_of("airplane/airplane-1/img/00000001.jpg") == "airplane/airplane-1"
    assert sequences.sequence_of("GOT-10k_Train_000001/00000001.jpg") == "GOT-10k_Train_000001"
    assert sequences.sequence_of("img1/000001.jpg") == ""  # the root is the sequence
    assert sequences.is_numbered_folder(["000001.jpg", "000002.jpg", "000004.jpg", "notes.txt"])
    # COCO's file names are numbers too, far apart: not a sequence.
    assert not sequences.is_numbered_folder(["000000391895.jpg", "000000397133.jpg"])
    assert not sequences.is_numbered_folder(["1.jpg", "cat.jpg"])
    assert not sequences.is_numbered_folder(["1.jpg"])


def test_seqinfo_keeps_every_byte_but_the_image_extension():
    seqinfo = SEQINFO.replace(b"{name}", b"MOT-01") + b"; comment imExt=.jpg\r\n"
    updated = sequences.set_image_extension(seqinfo, ".png")
    assert updated == seqinfo.replace(b"imExt=.jpg\r\n", b"imExt=.png\r\n", 1)
    assert sequences.frame_rate_of(seqinfo) == 25
    assert sequences.frame_rate_of(b"[Sequence]\nframeRate=0\n") is None


def test_mot_tree_comes_back_as_a_mot_tree(tmp_path, tiny_checkpoint, ray_session):
    source = tmp_path / "mot"
    labels = make_mot(source)
    assert corpus.detect_kind(source) == "sequences"
    # One sequence's own folder is a tracking layout too, named after the folder.
    single = corpus.discover_corpus(source / "train" / "MOT-01")
    assert single.kind == "sequences" and {e.sequence for e in single.entries()} == {"MOT-01"}
    assert sorted(f.relpath for f in single.sequence_files()) == [
        "det/det.txt", "gt/gt.txt", "seqinfo.ini"
    ]  # fmt: skip
    out, to = tmp_path / "out", tmp_path / "exported"
    # Tasks of two frames: each starts in the middle of its sequence.
    result = generate.run(generate_cfg(source, out, tiny_checkpoint, cpu_batch=2), progress=False)
    assert result.generated == 11 and [r["frame"] for r in result.rejects] == ["4"]
    rows = shards.read_index(out, ["relpath", "sequence", "frame"])
    assert sorted((r["sequence"], r["frame"]) for r in rows) == sorted(
        [("train/MOT-01", n) for n in range(1, 7)] + [("train/MOT-02", n) for n in (1, 2, 3, 5, 6)]
    )
    assert folders.describe(out)["sequences"] == 2  # tirsynth info says so
    exported = export.run(out, to, progress=False)
    assert (exported.images, exported.filled_frames, exported.empty_sequences) == (11, 1, [])

    # Read as a MOT loader does: seqinfo.ini names the folder, extension and length.
    for name in ("MOT-01", "MOT-02"):
        seq = to / "train" / name
        info = configparser.ConfigParser()
        info.read(seq / "seqinfo.ini")
        ext, length = info["Sequence"]["imExt"], int(info["Sequence"]["seqLength"])
        frames = sorted((seq / info["Sequence"]["imDir"]).glob(f"*{ext}"))
        assert [f.name for f in frames] == [f"{n:06d}.png" for n in range(1, length + 1)]
        for frame in frames:
            with Image.open(frame) as image:
                assert image.mode == "L" and image.size == (64, 48)
    for rel, data in labels.items():
        expected = data.replace(b".jpg", b".png") if rel.endswith("seqinfo.ini") else data
        assert (to / rel).read_bytes() == expected, rel
    # The rejected frame is its nearest generated neighbour (the earlier one on a tie).
    img1 = to / "train" / "MOT-02" / "img1"
    assert (img1 / "000004.png").read_bytes() == (img1 / "000003.png").read_bytes()
    # One video per sequence at seqinfo.ini's frame rate, the filled frame in its place.
    with_video = export.run(out, tmp_path / "with_video", progress=False, video_quality=None)
    assert with_video.videos == 2
    clip = tmp_path / "with_video" / "train" / "MOT-02.mkv"
    assert video.frame_count(clip) == 6 and video.frame_rate(clip) == 25
    reader = video.FrameReader(str(clip))
    assert np.array_equal(np.asarray(reader.frame(3).convert("L")),
                          np.asarray(Image.open(img1 / "000003.png")))  # fmt: skip


@pytest.mark.parametrize("layout", ["got10k", "lasot"])
def test_single_object_layouts_keep_their_folders_and_label_files(
    tmp_path, tiny_checkpoint, ray_session, layout
):
    source = tmp_path / layout
    if layout == "got10k":
        frames = [f"GOT-10k_Train_{s:06d}/{n:08d}.jpg" for s in (1, 2) for n in range(1, 4)]
        label_files = ["list.txt"] + [
            f"GOT-10k_Train_{s:06d}/{name}"
            for s in (1, 2)
            for name in ("groundtruth.txt", "absence.label", "meta_info.ini")
        ]
    else:
        frames = [f"airplane/airplane-{s}/img/{n:08d}.jpg" for s in (1, 2) for n in range(1, 4)]
        label_files = [
            f"airplane/airplane-{s}/{name}"
            for s in (1, 2)
            for name in ("groundtruth.txt", "full_occlusion.txt", "nlp.txt")
        ]
    for seed, rel in enumerate(frames):
        write_frame(source / rel, seed)
    for number, rel in enumerate(label_files):
        (source / rel).write_bytes(f"10,20,30,40\n{number},0,0,1\n".encode())
    out, to = tmp_path / "out", tmp_path / "exported"
    result = generate.run(generate_cfg(source, out, tiny_checkpoint), progress=False)
    assert result.generated == 6 and not result.rejects
    export.run(out, to, progress=False)
    for rel in frames:
        assert (to / rel).with_suffix(".png").is_file(), rel
    for rel in label_files:
        assert (to / rel).read_bytes() == (source / rel).read_bytes(), rel
    names = {r["sequence"] for r in shards.read_index(out, ["sequence"])}
    assert names == {sequences.sequence_of(rel) for rel in frames}


def test_video_frames_in_order_with_a_video_out(tmp_path, tiny_checkpoint, ray_session):
    clip = tmp_path / "videos" / "clip.mp4"
    write_video(clip, 9)  # frame n is flat grey of level 10 * n
    assert corpus.detect_kind(clip) == "video"
    out, to = tmp_path / "out", tmp_path / "exported"
    cfg = generate_cfg(clip, out, tiny_checkpoint, cpu_batch=2, keep_rgb=True)
    result = generate.run(cfg, progress=False)
    assert result.generated == 9 and not result.rejects
    # Tasks of 2 frames: the steps inside a task are measured (1-2, 3-4, 5-6, 7-8).
    temporal = result.report["temporal"]
    assert temporal["sequences"] == 1 and temporal["frame_steps"] == 4
    assert temporal["input_change"] == pytest.approx(10, abs=2)  # 10 levels a frame
    assert "Temporal stability" in (out / "report.html").read_text()
    # A killed run: one shard and its index fragment lost; the same command redoes only
    # those frames, with the same keys (frame keys come from the video's path and number).
    lost = sorted(out.glob("tir-*.tar"))[0]
    lost_keys = {
        r["key"] for r in shards.read_index(out, ["key", "shard"]) if r["shard"] == lost.name
    }
    lost.unlink()
    (out / shards.INDEX / f"{lost.stem}.parquet").unlink()
    again = generate.run(cfg, progress=False)
    assert again.generated == len(lost_keys) and again.total == 9
    assert sorted(r["frame"] for r in shards.read_index(out, ["frame"])) == list(range(1, 10))
    for row in shards.read_index(out, ["shard", "key", "frame", "sequence"]):
        assert row["sequence"] == "clip"
        sample = shards.read_samples(out / row["shard"], {row["key"]})[row["key"]]
        rgb = next(v for k, v in sample.items() if k.startswith("rgb."))
        level = np.asarray(Image.open(io.BytesIO(rgb)).convert("L")).mean()
        assert abs(level - 10 * (row["frame"] - 1)) < 3, row  # frame N is the video's Nth
    runner = CliRunner()
    exported = runner.invoke(cli, ["export", str(out), "--to", str(to), "--video", "lossless"])
    assert exported.exit_code == 0, exported.output
    frames = sorted((to / "clip").glob("*.png"))
    assert [f.name for f in frames] == [f"{n:06d}.png" for n in range(1, 10)]
    reader = video.FrameReader(str(to / "clip.mkv"))
    assert video.frame_rate(to / "clip.mkv") == 10  # the input's rate
    for number, frame in enumerate(frames):
        decoded = reader.frame(number).convert("L")
        assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(frame)))
    assert runner.invoke(cli, ["export", str(out), "--to", str(to), "--video", "99"]).exit_code == 2


def write_indexed_video(path: Path, frames: int) -> None:
    """An mp4 with its index first (`-movflags faststart`), as streamed files are: cut
    short, it still promises every frame."""
    import av

    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for n in range(frames):
            pixels = np.random.default_rng(n).integers(0, 256, (48, 64, 3), np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def test_broken_videos_are_rejects_and_numbered_frames_a_sequence(
    tmp_path, tiny_checkpoint, ray_session
):
    source = tmp_path / "mixed"
    write_video(source / "good.mp4", 4)
    data = (source / "good.mp4").read_bytes()
    (source / "garbage.mp4").write_bytes(bytes(range(256)) * 8)
    (source / "no_index.mp4").write_bytes(data[: len(data) // 2])  # its index was at the end
    write_indexed_video(tmp_path / "whole.mp4", 20)
    whole = (tmp_path / "whole.mp4").read_bytes()
    (source / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    for n in (1, 2, 3, 5):
        write_frame(source / "walk" / f"frame_{n:04d}.png", n)
    write_frame(source / "photos" / "000000391895.jpg", 9)
    out = tmp_path / "out"
    result = generate.run(generate_cfg(source, out, tiny_checkpoint), progress=False)
    reasons = {Path(r["path"]).name: r["reason"] for r in result.rejects}
    assert "not a readable video" in reasons["garbage.mp4"]
    assert "cut short" in reasons["no_index.mp4"]
    rows = {r["relpath"]: r for r in shards.read_index(out, ["relpath", "sequence", "frame"])}
    # The cut video: the frames present are generated, each missing one is a reject.
    present = sorted(r["frame"] for r in rows.values() if r["sequence"] == "cut")
    missing = sorted(int(r["frame"]) for r in result.rejects if r["sequence"] == "cut")
    assert present == list(range(1, len(present) + 1)) and len(present) < 20
    assert missing == list(range(len(present) + 1, 21))
    assert "cut short" in reasons["cut.mp4"]
    assert [rows[f"good/{n:06d}.png"]["frame"] for n in range(1, 5)] == [1, 2, 3, 4]
    assert rows["walk/frame_0005.png"]["sequence"] == "walk"
    assert rows["walk/frame_0005.png"]["frame"] == 5
    assert rows["photos/000000391895.jpg"]["sequence"] is None
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert manifest["input_kind"] == "folder"
    # Export: frame N exists for every N the video promised; the missing ones are copies.
    to = tmp_path / "exported"
    exported = export.run(out, to, progress=False)
    assert exported.filled_frames == len(missing)
    assert sorted(p.name for p in (to / "cut").iterdir()) == [f"{n:06d}.png" for n in range(1, 21)]


def test_temporal_change_is_measured_between_neighbouring_frames_of_a_sequence():
    """Frame 2 follows frame 1 in the batch; frame 5 has no predecessor there; an image
    outside any sequence gets nothing."""
    tir = np.zeros((4, 8, 8), np.uint8)
    tir[1] += 10  # frame 2's output: 10 levels above frame 1's
    pixels = np.zeros((4, 8, 8, 3), np.uint8)
    pixels[1] += 40  # and its input: 40 levels above
    batch = {
        "key": np.array(["a1", "a2", "a5", "x"], dtype=object),
        "sequence": np.array(["a", "a", "a", None], dtype=object),
        "frame": np.array([1, 2, 5, None], dtype=object),
        "tir": tir,
        "pixels": pixels,
        "content_width": np.array([8, 8, 8, 8]),
        "content_height": np.array([6, 6, 6, 6]),  # the square's padding is left out
    }
    scores = ["{}"] * 4
    generate.add_temporal_changes(batch, scores, ["", "", "", ""])
    measured = [json.loads(s) for s in scores]
    assert measured[1] == {"output_change": 10.0, "input_change": pytest.approx(40.0)}
    assert measured[0] == measured[2] == measured[3] == {}
    errors = ["failed", "", "", ""]  # a rejected frame is no one's predecessor
    scores = ["{}"] * 4
    generate.add_temporal_changes(batch, scores, errors)
    assert scores == ["{}"] * 4


def test_temporal_filter_runs_over_consecutive_frames_of_each_sequence_in_the_batch():
    """Frames in any order in the batch: a and b are filtered apart, each in frame order;
    a frame after a gap or a failed frame starts afresh, as does an image outside any
    sequence (left as it is); the input batch is not written to."""
    rng = np.random.default_rng(0)
    keys = ["a3", "b1", "a1", "x", "a2", "b2", "a5", "b3", "b4"]
    sequence = [k[0] if k != "x" else None for k in keys]
    frame = [int(k[1]) if k != "x" else None for k in keys]
    tir = rng.integers(0, 256, (len(keys), 8, 8)).astype(np.uint8)
    tir.setflags(write=False)
    batch = {
        "key": np.array(keys, dtype=object),
        "sequence": np.array(sequence, dtype=object),
        "frame": np.array(frame, dtype=object),
        "error": np.array(["", "", "", "", "", "", "", "failed", ""], dtype=object),
        "tir": tir,
        "pixels": np.zeros((len(keys), 8, 8, 3), np.uint8),  # a still input
        "content_width": np.array([8] * len(keys)),
        "content_height": np.array([6] * len(keys)),
    }
    steady = generate.steady_sequences(batch, 4.0)["tir"]
    index = {k: i for i, k in enumerate(keys)}
    expected_a = temporal.steady_frames([tir[index[k]][:6] for k in ("a1", "a2", "a3")],
                                        [np.zeros((6, 8))] * 3, 4.0)  # fmt: skip
    for k, frame_a in zip(("a1", "a2", "a3"), expected_a, strict=True):
        assert np.array_equal(steady[index[k]][:6], frame_a)
    expected_b = temporal.steady_frames([tir[index[k]][:6] for k in ("b1", "b2")],
                                        [np.zeros((6, 8))] * 2, 4.0)  # fmt: skip
    assert np.array_equal(steady[index["b2"]][:6], expected_b[1])
    for k in ("b1", "a1", "a5", "b4", "x", "b3"):  # first of a run, alone, or outside
        assert np.array_equal(steady[index[k]], tir[index[k]]), k
    assert not np.array_equal(steady[index["a3"]], tir[index["a3"]])
    assert np.array_equal(steady[index["a3"]][6:], tir[index["a3"]][6:])  # padding untouched


def test_generate_with_a_temporal_filter_changes_less_where_the_input_is_still(
    tmp_path, tiny_checkpoint, ray_session
):
    """A clip whose brightness flickers by 6 grey levels (still, for tau 16): with the filter
    the outputs change less from frame to frame than without; a resume with another filter
    is refused."""
    clip = tmp_path / "clip.mp4"
    write_video(clip, 12, levels=[80, 86] * 6)
    change = {}
    for tau in (None, 16.0):
        out = tmp_path / f"out-{tau}"
        cfg = generate_cfg(clip, out, tiny_checkpoint, cpu_batch=12, temporal_filter=tau)
        result = generate.run(cfg, progress=False)
        assert result.generated == 12
        change[tau] = result.report["temporal"]["output_change"]
    assert change[None] > 0 and change[16.0] < 0.6 * change[None]
    other = generate_cfg(
        clip, tmp_path / "out-16.0", tiny_checkpoint, cpu_batch=12, temporal_filter=8.0
    )
    with pytest.raises(FileExistsError, match="temporal_filter 16.0 -> 8.0"):
        generate.run(other, progress=False)
