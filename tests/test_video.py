from pathlib import Path

import numpy as np
import pytest
from conftest import write_video

from tirsynth import ingest, layouts, shards, video
from tirsynth.config import IngestConfig


@pytest.fixture
def video_pairs(tmp_path) -> Path:
    root = tmp_path / "clips"
    for clip, frames in (("a", 12), ("b", 7), ("c", 9), ("d", 5)):
        write_video(root / "visible" / f"{clip}.mp4", frames)
        write_video(root / "infrared" / f"{clip}.mp4", frames, offset=5)
    write_video(root / "visible" / "short.mp4", 6)
    write_video(root / "infrared" / "short.mp4", 4)  # cannot be registered frame by frame
    write_video(root / "visible" / "alone.mp4", 3)
    (root / "visible" / "broken.mp4").write_text("not a video")
    (root / "infrared" / "broken.mp4").write_text("not a video either")
    return root


def test_frames_are_read_in_order_and_named_by_number(tmp_path):
    import io

    from PIL import Image

    clip = tmp_path / "c.mp4"
    write_video(clip, 6)
    assert video.frame_count(clip) == 6
    assert video.parse_frame_path(video.frame_path(clip, 4)) == (str(clip), 4)
    assert video.parse_frame_path(str(clip)) is None
    reader = video.FrameReader(str(clip))
    levels = [np.asarray(reader.frame(n).convert("L")).mean() for n in (0, 3, 5, 1)]
    assert np.allclose(levels, [0, 30, 50, 10], atol=3)  # 1 after 5: reopened, not wrong
    stored = video.read_frame(video.frame_path(clip, 2), "tir")
    with Image.open(io.BytesIO(stored.data)) as frame:
        assert frame.mode == "L" and abs(np.asarray(frame).mean() - 20) < 3
    with pytest.raises(Exception, match="ends before frame 9"):
        video.read_frame(video.frame_path(clip, 9), "rgb")


def test_paired_video_layout_ingests_every_nth_frame_whole_clips_per_split(video_pairs, tmp_path):
    assert layouts.detect_layout(video_pairs) == "video"
    out = tmp_path / "data"
    result = ingest.run(
        IngestConfig(
            sources=(str(video_pairs),), out=str(out), frame_stride=3, split=(0.5, 0.25, 0.25)
        )
    )
    index = shards.read_index(out)
    frames = {(row["clip"], int(row["frame"])) for row in index}
    assert frames == {(c, n) for c, count in (("a", 12), ("b", 7), ("c", 9), ("d", 5))
                      for n in range(0, count, 3)}  # fmt: skip
    for clip in "abcd":
        assert len({row["split"] for row in index if row["clip"] == clip}) == 1
    reasons = sorted(r["reason"] for r in result.rejects)
    assert reasons[:2] == ["frame-count mismatch: RGB 6 frames, TIR 4", "missing TIR partner"]
    assert len(reasons) == 3 and "not a readable video" in reasons[2]
    # The stored frames are the clips' frames: RGB level 10 n, TIR 10 n + 5, one channel.
    from tirsynth.inference import iter_pairs

    for pair in iter_pairs(out, index):
        number = int(pair["key"].rsplit("_", 1)[1])
        assert abs(pair["rgb_pixels"].mean() - 10 * number) < 3
        assert pair["real"].ndim == 2 and abs(pair["real"].mean() - 10 * number - 5) < 3
    again = ingest.run(
        IngestConfig(
            sources=(str(video_pairs),), out=str(out), frame_stride=3, split=(0.5, 0.25, 0.25)
        )
    )
    assert again.added == 0 and again.pairs == result.pairs


def test_a_meta_row_keyed_by_clip_sets_split_and_daynight_for_all_its_frames(video_pairs, tmp_path):
    meta = tmp_path / "clips.csv"
    # "a" to an unused split (M3SVD's smoke clips), "b" to test at night; "c" and "d" by
    # hash; a key row beats its clip's row; a clip that is not there is reported unmatched.
    meta.write_text(
        "key,clip,split,daynight\n"
        ",a,smoke,day\n"
        ",b,test,night\n"
        "clips_b_000003,,train,\n"
        ",nowhere,train,\n"
    )
    out = tmp_path / "data"
    result = ingest.run(
        IngestConfig(sources=(str(video_pairs),), out=str(out), frame_stride=3, meta=str(meta))
    )
    index = shards.read_index(out)
    by_clip = {}
    for row in index:
        by_clip.setdefault(row["clip"], set()).add((row["split"], row["daynight"], row["frame"]))
    assert by_clip["a"] == {("smoke", "day", str(n)) for n in (0, 3, 6, 9)}
    night = ("test", "night")
    assert by_clip["b"] == {(*night, "0"), ("train", "unknown", "3"), (*night, "6")}
    assert all(split in ("train", "val", "test") for split, _, _ in by_clip["c"] | by_clip["d"])
    assert result.meta_unmatched == ["nowhere"]
    meta.write_text("key,clip,split\n,a,test\n,,train\n")
    with pytest.raises(ValueError, match="line 3: no key, stem, clip to match it by"):
        ingest.run(IngestConfig(sources=(str(video_pairs),), out=str(out), meta=str(meta)))


def test_m3svd_as_published(shared_data, tmp_path):
    """The shared M3SVD clips: detected, every 10th frame, each row naming clip and frame."""
    source = shared_data / "m3svd"
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    out = tmp_path / "m3svd"
    # One process: forking this test session, which holds Ray and FFmpeg state from earlier
    # tests, once killed the session without a word (ingest forks from a plain CLI process).
    result = ingest.run(IngestConfig(sources=(str(source),), out=str(out), workers=1))
    index = shards.read_index(out)
    counts = {
        clip: sum(1 for r in index if r["clip"] == clip) for clip in {r["clip"] for r in index}
    }
    # 560, 407, 590 and 205 frames: ceil(n / 10) each.
    assert sorted(counts.values()) == sorted(-(-n // 10) for n in (560, 407, 590, 205))
    assert not result.rejects and {(r["width"], r["height"]) for r in index} == {(640, 480)}


def test_frames_far_ahead_or_behind_are_found_by_seeking_and_match_decoding_in_order(tmp_path):
    clip = tmp_path / "long.mp4"
    write_video(clip, 120)  # level 10 * n mod 256: frames 0 and 26 differ by 4 levels only
    in_order = video.FrameReader(str(clip))
    expected = [np.asarray(in_order.frame(n)) for n in range(120)]
    reader = video.FrameReader(str(clip))
    for number in (100, 7, 119, 60, 61, 0, 110, 55):
        assert np.array_equal(np.asarray(reader.frame(number)), expected[number]), number
    # Each jump seeks to the keyframe before its frame (mpeg4's keyframes are 12 apart)
    # instead of decoding from the start, which would take 101 + 8 + 120 + ... frames.
    assert reader.position == 55 and reader.decoded <= 8 * 12
    with pytest.raises(Exception, match="ends before frame 120"):
        reader.frame(120)


@pytest.mark.parametrize("quality", [None, 23])
def test_write_video_lossless_keeps_every_value_and_crf_writes_a_playable_mp4(tmp_path, quality):
    from fractions import Fraction

    from PIL import Image

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (47, 65), np.uint8) for _ in range(6)]
    target = tmp_path / f"seq{video.video_suffix(quality)}"
    video.write_video((Image.fromarray(f) for f in frames), target, Fraction(25), quality)
    assert video.frame_count(target) == 6 and video.frame_rate(target) == 25
    assert not list(tmp_path.glob(".*.tmp"))
    reader = video.FrameReader(str(target))
    decoded = [np.asarray(reader.frame(n).convert("L")) for n in range(6)]
    if quality is None:
        assert all(np.array_equal(a, b) for a, b in zip(decoded, frames, strict=True))
    else:  # yuv420p: even sizes, lossy
        assert decoded[0].shape == (46, 64)


def test_csv_of_video_pairs_ingests_frames_at_the_stride_each_clip_in_one_split(tmp_path):
    root = tmp_path / "csvclips"
    for clip, frames, tir_frames in (("a", 9, 9), ("b", 6, 6), ("c", 5, 4)):
        write_video(root / "rgb" / f"{clip}.mp4", frames)
        write_video(root / "ir" / f"{clip}.mp4", tir_frames, offset=5)
    table = root / "pairs.csv"
    table.write_text(
        "rgb,tir,key,split,daynight\n"
        "rgb/a.mp4,ir/a.mp4,walk,test,day\n"
        "rgb/b.mp4,ir/b.mp4,,,\n"
        "rgb/c.mp4,ir/c.mp4,,,\n"
    )
    assert layouts.detect_layout(table) == "csv"
    out = tmp_path / "data"
    result = ingest.run(IngestConfig(sources=(str(table),), out=str(out), frame_stride=4))
    index = shards.read_index(out)
    frames = sorted((row["clip"], int(row["frame"])) for row in index)
    assert frames == [("rgb/b", 0), ("rgb/b", 4), ("walk", 0), ("walk", 4), ("walk", 8)]
    assert {(row["split"], row["daynight"]) for row in index if row["clip"] == "walk"} == {
        ("test", "day")
    }
    assert len({row["split"] for row in index if row["clip"] == "rgb/b"}) == 1
    assert [r["reason"] for r in result.rejects] == ["frame-count mismatch: RGB 5 frames, TIR 4"]


def test_csv_frame_range_keeps_part_of_a_clip_and_rejects_a_bad_range(tmp_path):
    root = tmp_path / "ranges"
    write_video(root / "rgb" / "a.mp4", 10)
    write_video(root / "ir" / "a.mp4", 10, offset=5)
    table = root / "pairs.csv"
    table.write_text(
        "rgb,tir,key,split,first_frame,last_frame\n"
        "rgb/a.mp4,ir/a.mp4,clear,train,5,\n"  # the part without smoke, to the end
        "rgb/a.mp4,ir/a.mp4,smoke,test,0,3\n"  # scored apart
        "rgb/a.mp4,ir/a.mp4,late,test,8,12\n"  # past the clip's 10 frames
        "rgb/a.mp4,ir/a.mp4,odd,test,x,\n"
        "rgb/a.mp4,ir/a.mp4,back,test,4,2\n"
    )
    out = tmp_path / "data"
    result = ingest.run(IngestConfig(sources=(str(table),), out=str(out), frame_stride=2))
    index = shards.read_index(out)
    frames = sorted((row["clip"], int(row["frame"]), row["split"]) for row in index)
    assert frames == [
        ("clear", 5, "train"), ("clear", 7, "train"), ("clear", 9, "train"),
        ("smoke", 0, "test"), ("smoke", 2, "test"),
    ]  # fmt: skip
    reasons = sorted(r["reason"] for r in result.rejects)
    assert reasons == [
        "CSV line 5: first_frame 'x' is not a frame number (0, 1, ...)",
        "CSV line 6: last_frame 2 is before first_frame 4",
        "frame range 8-12 is outside the clip's 10 frames",
    ]
