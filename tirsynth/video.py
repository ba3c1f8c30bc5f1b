"""Frames of video files, decoded with PyAV (`av`), for paired RGB/TIR clips.

A frame is named by its video's path and its number: `clip.mp4#frame=120` (`frame_path`,
`parse_frame_path`). `FrameReader` decodes forward, so frames asked for in order cost one
decode each; an earlier frame reopens the file. Frames are numbered from 0 in decoding
order.
"""

from __future__ import annotations

import hashlib
import io
import os
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
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as error:
        raise ValueError(f"not a readable video ({error.strerror or error})") from error


class FrameReader:
    """Frames of one video in increasing order, decoding each once."""

    def __init__(self, path: str) -> None:
        self.path, self.container, self.frames, self.position = path, None, None, -1

    def frame(self, number: int) -> Image.Image:
        import av

        if self.container is None or number <= self.position:
            self.close()
            self.container = av.open(self.path)
            # One decoding thread: ingest runs one reader per forked worker, and a process
            # that forks while FFmpeg's thread pool exists hands its child locked mutexes.
            self.container.streams.video[0].thread_count = 1
            self.frames = self.container.decode(video=0)
            self.position = -1
        try:
            while self.position < number:
                frame = next(self.frames)
                self.position += 1
        except StopIteration:
            raise images.ImageRejected(
                f"video {self.path} ends before frame {number} (truncated?)"
            ) from None
        except av.FFmpegError as error:
            raise images.ImageRejected(f"video {self.path}: frame {number}: {error}") from error
        return frame.to_image()

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container = None


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
