"""Frames of video files, decoded with PyAV (`av`), for paired RGB/TIR clips.

A frame is named by its video's path and its number: `clip.mp4#frame=120` (`frame_path`,
`parse_frame_path`). `FrameReader` decodes forward, so frames asked for in order cost one
decode each, and seeks to the keyframe before a frame far ahead or behind. Frames are
numbered from 0 in presentation order.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image

from tirsynth import images

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}
FRAME_MARK = "#frame="


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def frame_path(video: str | Path, number: int) -> str:
    return f"{video}{FRAME_MARK}{number}"


def parse_frame_path(path: str) -> tuple[str, int] | None:
    """(video path, frame number) of a `frame_path`, or None for an ordinary file."""
    video, mark, number = path.rpartition(FRAME_MARK)
    if not mark or not number.isdigit():
        return None
    return video, int(number)


def frame_count(path: str | Path) -> int:
    """Frames of the first video stream: its packets with data, counted without decoding.

    Raises:
        ValueError: the file is not a video PyAV can open, or holds no video stream (the
            reason alone: the caller names the file).
    """
    return probe(path).frames


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # packets with data in the first video stream
    declared: int  # frames the container's index promises (0: it does not say)
    rate: Fraction  # average frame rate (the codec's guess, else 30)


def probe(path: str | Path) -> VideoInfo:
    """Count a video's frames and read its rate, without decoding. A file cut short keeps
    the index of a whole one: `declared` above `frames` says that frames are missing.

    Raises:
        ValueError: as `frame_count`.
    """
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream (not a video, or cut short before its index)")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            declared = stream.frames
            frames = sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as error:
        raise ValueError(f"not a readable video ({error.strerror or error})") from error
    return VideoInfo(frames, declared, Fraction(rate) if rate else Fraction(30))


def frame_rate(path: str | Path) -> Fraction:
    return probe(path).rate


SEEK_AFTER = 48  # frames: a jump forward further than this seeks instead of decoding on
_TIMESTAMPS_KEPT = 64  # videos whose frame timestamps a process keeps


class FrameReader:
    """Frames of one video by number, counted from 0 in presentation order.

    Frames asked for in increasing order cost one decode each. A jump back, or forward by
    more than SEEK_AFTER frames, seeks to the keyframe before the frame (found by its
    timestamp, from one demux of the file without decoding) and decodes from there: a
    parallel task that starts in the middle of a long video decodes its own frames, not
    every frame before them.
    """

    def __init__(self, path: str) -> None:
        self.path, self.container, self.frames, self.position = path, None, None, -1
        self.decoded = 0  # frames decoded so far: what seeking saves

    def frame(self, number: int) -> Image.Image:
        import av

        position = self.position if self.container is not None else None
        try:
            if position is None or not position < number <= position + SEEK_AFTER:
                self._open_at(number)
            while self.position is None or self.position < number:
                frame = next(self.frames)
                self.decoded += 1
                self.position = self._number_of(frame)
        except images.ImageRejected:
            self.close()
            raise
        except StopIteration:
            self.close()
            raise images.ImageRejected(
                f"video {self.path} ends before frame {number} (truncated?)"
            ) from None
        except av.FFmpegError as error:
            self.close()  # the decoder's state is unknown: the next frame reopens the file
            raise images.ImageRejected(f"video {self.path}: frame {number}: {error}") from error
        if self.position != number:  # the frame has no picture of its own (a gap in pts)
            raise images.ImageRejected(f"video {self.path}: frame {number} cannot be decoded")
        return frame.to_image()

    def _open_at(self, number: int) -> None:
        import av

        self.close()
        self.container = av.open(self.path)
        stream = self.container.streams.video[0]
        # One decoding thread: ingest runs one reader per forked worker, and a process
        # that forks while FFmpeg's thread pool exists hands its child locked mutexes.
        stream.thread_count = 1
        stamps, self.numbers = _timestamps(self.path)
        self.position = -1
        if 0 < number < len(stamps):
            self.container.seek(stamps[number], stream=stream, backward=True)
            self.position = None
        self.frames = self.container.decode(stream)

    def _number_of(self, frame) -> int:
        if self.numbers is None:  # counted from the start: no seek was made
            return self.position + 1
        if frame.pts not in self.numbers:
            raise images.ImageRejected(f"video {self.path}: a frame has no known timestamp")
        return self.numbers[frame.pts]

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container = None


_stamps_by_video: dict[str, tuple[list[int], dict[int, int] | None]] = {}


def _timestamps(path: str) -> tuple[list[int], dict[int, int] | None]:
    """(the pts of frame 0, 1, ... of the first video stream, pts -> frame number); both
    empty or None when a packet has no pts or two share one: then frames are only counted
    from the start."""
    if path not in _stamps_by_video:
        import av

        with av.open(path) as container:
            stream = container.streams.video[0]
            stamps = [p.pts for p in container.demux(stream) if p.size]
        usable = None not in stamps and len(set(stamps)) == len(stamps)
        if len(_stamps_by_video) >= _TIMESTAMPS_KEPT:
            _stamps_by_video.pop(next(iter(_stamps_by_video)))
        stamps = sorted(stamps) if usable else []
        numbers = {pts: n for n, pts in enumerate(stamps)} if usable else None
        _stamps_by_video[path] = stamps, numbers
    return _stamps_by_video[path]


_readers: dict[str, FrameReader] = {}  # by role: the RGB and the TIR clip of a pair
_inherited: list[FrameReader] = []


def _forget_parents_readers() -> None:
    """In a forked child: open its own files instead of sharing the parent's offsets, and
    never free the copies (freeing FFmpeg's copied thread pools waits forever on locks
    that the parent's threads held at the fork)."""
    _inherited.extend(_readers.values())
    _readers.clear()


os.register_at_fork(after_in_child=_forget_parents_readers)


def close_readers() -> None:
    """Close this process's open videos (before a fork, or when done)."""
    for reader in _readers.values():
        reader.close()
    _readers.clear()


def read_frame(path: str, role: images.Role) -> images.StoredImage:
    """A `frame_path`'s frame as a stored PNG: RGB for colour; one channel for thermal
    (video codecs carry gray thermal in three equal channels)."""
    video, number = parse_frame_path(path)
    reader = _readers.get(role)
    if reader is None or reader.path != video:
        if reader is not None:
            reader.close()
        reader = _readers[role] = FrameReader(video)
    image = reader.frame(number)
    image = image.convert("RGB" if role == "rgb" else "L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    return images.StoredImage(
        data, "png", image.width, image.height, image.mode, digest, f"video frame {number}->PNG"
    )


def video_suffix(quality: int | None) -> str:
    return ".mkv" if quality is None else ".mp4"


def write_video(
    frames: Iterable[Image.Image], target: Path, rate: Fraction, quality: int | None = None
) -> None:
    """Encode gray frames as one video, atomically.

    `quality` None: lossless, FFV1 in 8-bit gray in Matroska (`.mkv`), every value kept.
    Otherwise H.264 (x264) at CRF `quality` (0..51, lower is better; about 18 looks
    lossless) in yuv420p `.mp4`, which every player reads; yuv420p halves the chroma, so
    an odd width or height loses its last pixel there.
    """
    import av

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    codec, pix_fmt = ("ffv1", "gray") if quality is None else ("libx264", "yuv420p")
    try:
        with av.open(str(temporary), "w", format="matroska" if quality is None else "mp4") as out:
            stream = out.add_stream(codec, rate=rate)
            stream.pix_fmt = pix_fmt
            if quality is not None:
                stream.options = {"crf": str(quality)}
            for number, image in enumerate(frames):
                if number == 0:
                    even = 2 if quality is not None else 1
                    stream.width = image.width // even * even
                    stream.height = image.height // even * even
                image = image.convert("L").crop((0, 0, stream.width, stream.height))
                frame = av.VideoFrame.from_image(image).reformat(format=pix_fmt)
                frame.pts = number
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
