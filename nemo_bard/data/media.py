"""Image and video loading for training rows, generation, evaluation and the lmms-eval plugin.

Images: a path (absolute, or relative to ``root_dir``), ``{"bytes": ...}``, ``{"path": ...}`` or a PIL image.

Videos: a file (mp4, webm, mkv, ... decoded with PyAV, ``pip install 'nemo-bard[video]'``), encoded
bytes (``{"bytes": ...}``), a directory of frame images (sorted by name) or a list of frames. Frames are
sampled the way Qwen3-VL samples them (:class:`VideoSampling`: ``fps`` frames per second, clamped to
``[min_frames, max_frames]``, spread evenly over the clip) and only the sampled frames are decoded;
the result keeps the source frame rate and the sampled frame indices (:class:`transformers.video_utils.VideoMetadata`)
so the processor writes the right timestamps into the prompt. Frame directories and frame lists are
clips at ``VideoSampling.fps`` frames per second.

Training rows keep videos as :class:`VideoSource` (checked, not decoded) until the collate decodes
them in the dataloader workers. Problems raise :class:`MediaError`, whose message names the file.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MAX_ASPECT_RATIO = 200  # Qwen2-VL / Qwen3-VL processors refuse images whose long side exceeds 200x the short one
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpeg", ".mpg", ".ts", ".flv", ".3gp")
VIDEO_EXTRA_HINT = "pip install 'nemo-bard[video]'"


class MediaError(ValueError):
    """An unreadable image or video; the message names the file."""


class VideoDecoderMissing(ImportError):
    """PyAV is not installed; the message names the extra to install."""


def _path(ref: str | os.PathLike, root_dir: str | os.PathLike | None) -> Path:
    path = Path(ref)
    return path if path.is_absolute() or root_dir is None else Path(root_dir) / path


def _where_hint(root_dir: str | os.PathLike | None) -> str:
    return f" (relative paths resolve against root_dir={root_dir})" if root_dir is not None else ""


# ------------------------------------------------------------------------------------------ images


def check_image_shape(image: Any, name: str) -> Any:
    """``image`` (a PIL image) unchanged, or :class:`MediaError` when the processor cannot take its shape: an empty
    image, or an aspect ratio above :data:`MAX_ASPECT_RATIO` (e.g. a 1 x 10000 strip)."""
    width, height = image.size
    if min(width, height) < 1:
        raise MediaError(f"{name} is empty ({width}x{height} pixels)")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise MediaError(f"{name} is {width}x{height} pixels, an aspect ratio above the {MAX_ASPECT_RATIO}:1 the "
                         "Qwen3-VL processor accepts; crop, pad or drop it")
    return image


def load_image(ref: Any, root_dir: str | os.PathLike | None = None):
    """An RGB PIL image from a path, ``{"bytes": ...}``, ``{"path": ...}``, a PIL image or an ``[H, W, C]`` array.

    :class:`MediaError` names the file when it is missing or unreadable, or when its shape is one the processor
    refuses (:func:`check_image_shape`)."""
    if isinstance(ref, Image.Image):
        return check_image_shape(ref, "image").convert("RGB")
    if isinstance(ref, np.ndarray):
        return check_image_shape(Image.fromarray(ref), "image").convert("RGB")
    if isinstance(ref, dict):
        if ref.get("bytes") is not None:
            try:
                image = Image.open(io.BytesIO(ref["bytes"])).convert("RGB")
            except Exception as exc:  # noqa: BLE001 - PIL raises several types
                raise MediaError(f"image bytes are not a readable image ({exc})") from None
            return check_image_shape(image, "image bytes")
        ref = ref.get("path")
    if not isinstance(ref, (str, os.PathLike)):
        raise MediaError(f"image must be a path, {{'bytes': ...}} or {{'path': ...}}, got {type(ref).__name__}")
    path = _path(ref, root_dir)
    if not path.is_file():
        raise MediaError(f"image file {path} not found{_where_hint(root_dir)}")
    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise MediaError(f"cannot read image {path} ({exc})") from None
    return check_image_shape(image, f"image {path}")


# ------------------------------------------------------------------------------------------ videos


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a clip the model sees (Qwen3-VL's rule; its video processor's defaults).

    ``round(duration * fps)`` frames clamped to ``[min_frames, max_frames]`` and to the clip's frame
    count, at evenly spaced frame indices. A one-frame clip is shown as two identical frames (the
    vision tower's temporal patch).
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.min_frames < 1 or self.max_frames < self.min_frames:
            raise ValueError(f"video sampling needs fps > 0 and 1 <= min_frames <= max_frames, got {self}")

    @classmethod
    def from_processor(cls, video_processor: Any = None, **overrides: Any) -> "VideoSampling":
        """The processor's ``fps`` / ``min_frames`` / ``max_frames`` with the non-None ``overrides`` on top.

        A ``max_frames`` override below the processor's ``min_frames`` lowers ``min_frames`` with it.
        """
        values = {k: getattr(video_processor, k, None) for k in ("fps", "min_frames", "max_frames")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        values = {k: v for k, v in values.items() if v is not None}
        if overrides.get("min_frames") is None and "max_frames" in values:
            values["min_frames"] = min(values.get("min_frames", cls.min_frames), values["max_frames"])
        return cls(**values)

    def indices(self, total_frames: int, video_fps: float) -> np.ndarray:
        """Sampled frame indices of a ``total_frames``-frame clip recorded at ``video_fps``."""
        # transformers: ~8 s; front ends import this module before checking their arguments
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
        from transformers.video_utils import VideoMetadata

        # Qwen3VLVideoProcessor.sample_frames reads only fps/min_frames/max_frames from `self`
        idx = Qwen3VLVideoProcessor.sample_frames(self, VideoMetadata(total_num_frames=total_frames, fps=video_fps))
        return np.repeat(idx, 2) if len(idx) == 1 else idx


@dataclass(frozen=True)
class VideoSource:
    """A checked, not yet decoded video: a file, encoded bytes, or frame images (paths or PIL images)."""

    name: str
    path: Path | None = None
    data: bytes | None = None
    frames: tuple = ()


@dataclass
class Video:
    """Decoded frames ``[T, H, W, 3]`` uint8 and their metadata (source fps, sampled frame indices)."""

    frames: np.ndarray
    metadata: Any  # transformers.video_utils.VideoMetadata
    source: VideoSource

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def subsample(self, num_frames: int) -> "Video":
        """``num_frames`` of these frames, evenly spaced (metadata indices follow)."""
        keep = np.linspace(0, len(self) - 1, num_frames).round().astype(int)
        meta = replace(self.metadata, frames_indices=[int(self.metadata.frames_indices[i]) for i in keep])
        return Video(self.frames[keep], meta, self.source)


def require_video_decoder(name: str = "video files") -> None:
    """Raise :class:`VideoDecoderMissing` unless PyAV is importable."""
    # see VideoSampling.indices
    from transformers.utils import is_av_available

    if not is_av_available():
        raise VideoDecoderMissing(f"decoding {name} needs PyAV: {VIDEO_EXTRA_HINT}")


def is_video_path(ref: Any) -> bool:
    """True for a path (string) with a video file suffix or naming a directory (of frames)."""
    if not isinstance(ref, (str, os.PathLike)):
        return False
    return str(ref).lower().endswith(VIDEO_SUFFIXES) or Path(ref).is_dir()


def video_source(ref: Any, root_dir: str | os.PathLike | None = None) -> VideoSource:
    """Check a video reference without decoding it.

    ``ref``: a file or frame-directory path (relative to ``root_dir``), ``{"bytes": ...}``,
    ``{"path": ...}``, a list of frames (paths or PIL images), or a :class:`VideoSource`.
    """
    if isinstance(ref, VideoSource):
        return ref
    if isinstance(ref, dict):
        if ref.get("bytes") is not None:
            require_video_decoder("video bytes")
            return VideoSource("<video bytes>", data=bytes(ref["bytes"]))
        ref = ref.get("path")
    if isinstance(ref, (list, tuple)):
        if not ref:
            raise MediaError("video frame list is empty")
        frames = tuple(f if not isinstance(f, (str, os.PathLike)) else _path(f, root_dir) for f in ref)
        for f in frames:
            if isinstance(f, Path) and not f.is_file():
                raise MediaError(f"video frame {f} not found{_where_hint(root_dir)}")
        return VideoSource(f"<list of {len(frames)} frames>", frames=frames)
    if not isinstance(ref, (str, os.PathLike)):
        raise MediaError(f"video must be a path, {{'bytes': ...}} or a list of frames, got {type(ref).__name__}")
    path = _path(ref, root_dir)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise MediaError(f"video frame directory {path} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
        return VideoSource(str(path), path=path, frames=tuple(files))
    if not path.is_file():
        raise MediaError(f"video file {path} not found{_where_hint(root_dir)}")
    require_video_decoder(f"video file {path}")
    return VideoSource(str(path), path=path)


def load_video(ref: Any, sampling: VideoSampling | None = None, root_dir: str | os.PathLike | None = None) -> Video:
    """Decode the sampled frames of a video (any form :func:`video_source` accepts, or a :class:`Video`)."""
    # see VideoSampling.indices
    from transformers.video_utils import VideoMetadata

    if isinstance(ref, Video):
        return ref
    sampling = sampling or VideoSampling()
    src = video_source(ref, root_dir)
    if not src.frames:
        return _decode_av(src, sampling)
    idx = sampling.indices(len(src.frames), sampling.fps)
    images = [np.asarray(load_image(src.frames[i])) for i in idx]
    if len({f.shape for f in images}) > 1:
        raise MediaError(f"the frames of video {src.name} differ in size")
    frames = np.stack(images)
    meta = VideoMetadata(
        total_num_frames=len(src.frames), fps=sampling.fps, width=frames.shape[2], height=frames.shape[1],
        duration=len(src.frames) / sampling.fps, video_backend="frames", frames_indices=[int(i) for i in idx],
    )
    return Video(frames, meta, src)


def _decode_av(src: VideoSource, sampling: VideoSampling) -> Video:
    """Decode ``sampling``'s frames with PyAV.

    A demux pass (no decoding) gives the exact frame count, presentation timestamps and keyframes,
    also for containers whose header has no frame count (webm, mkv). Decoding then runs forward from
    the keyframe before each sampled frame, seeking only when that skips a keyframe interval; frames
    that are neither sampled nor referenced (e.g. most H.264 B-frames) are not decoded, and only the
    sampled frames are converted to RGB.
    """
    # optional dependency (the [video] extra)
    import av
    from transformers.video_utils import VideoMetadata

    try:
        container = av.open(io.BytesIO(src.data) if src.data is not None else str(src.path))
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError(f"cannot open video {src.name} as a video file ({_ffmpeg_reason(exc)})") from None
    with container:
        if not container.streams.video:
            raise MediaError(f"video {src.name} has no video stream")
        stream = container.streams.video[0]
        try:
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
        except av.error.FFmpegError as exc:
            raise MediaError(f"cannot read video {src.name} ({_ffmpeg_reason(exc)})") from None
        if not packets:
            raise MediaError(f"video {src.name} holds no frames (empty or cut short)")
        total = len(packets)
        rate = stream.average_rate or stream.guessed_rate
        duration = float(container.duration) / av.time_base if container.duration else None
        fps = float(rate) if rate else (total / duration if duration else 24.0)
        idx = sampling.indices(total, fps)
        stream.thread_type = "AUTO"  # frame threads take the skip setting with each packet they are handed
        try:
            if all(pts is not None for pts, _ in packets):
                rgb = _decode_by_pts(container, stream, packets, idx)
            else:  # no timestamps (raw streams): count frames in decoding order
                container.seek(0)
                rgb = _decode_in_order(container, stream, idx)
        except av.error.FFmpegError as exc:
            raise MediaError(f"cannot decode video {src.name} ({_ffmpeg_reason(exc)})") from None
        if len(rgb) < len(idx):
            raise MediaError(f"video {src.name} is damaged: decoded {len(rgb)} of {len(idx)} sampled frames "
                             f"(the container lists {total} frames)")
        frames = np.stack(rgb)
    meta = VideoMetadata(
        total_num_frames=total, fps=fps, width=frames.shape[2], height=frames.shape[1],
        duration=duration or total / fps, video_backend="pyav", frames_indices=[int(i) for i in idx],
    )
    return Video(frames, meta, src)


def _decode_by_pts(container: Any, stream: Any, packets: list[tuple[int, bool]], idx: np.ndarray) -> list[np.ndarray]:
    pts = sorted(p for p, _ in packets)  # presentation order
    keys = sorted(p for p, key in packets if key) or pts[:1]
    targets = [pts[i] for i in idx]
    wanted = set(targets)
    codec = stream.codec_context

    def frames_from(key: int):
        container.seek(key, stream=stream, backward=True, any_frame=False)
        for packet in container.demux(stream):
            # a frame that is not sampled is decoded only when later frames reference it
            codec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
            yield from codec.decode(packet)

    got: dict[int, np.ndarray] = {}
    frames, last = None, None
    for target in targets:
        if target in got:  # repeated index (one-frame clip)
            continue
        key = keys[max(np.searchsorted(keys, target, side="right") - 1, 0)]
        if frames is None or (last is not None and key > last):  # skip whole keyframe intervals: seek
            frames = frames_from(key)
        for frame in frames:
            last = frame.pts if frame.pts is not None else target
            if last in wanted and last not in got:
                got[last] = frame.to_ndarray(format="rgb24")
            if last >= target:
                if target not in got:  # imprecise seek: the first frame after the target stands in
                    got[target] = frame.to_ndarray(format="rgb24")
                break
    return [got[t] for t in targets if t in got]


def _decode_in_order(container: Any, stream: Any, idx: np.ndarray) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    want = list(idx)
    for i, frame in enumerate(container.decode(stream)):
        while want and want[0] == i:
            out.append(frame.to_ndarray(format="rgb24"))
            want.pop(0)
        if not want:
            break
    return out


def _ffmpeg_reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def video_processor_kwargs(videos: list[Video], size: dict | None = None) -> dict[str, Any]:
    """Processor kwargs for decoded videos: frames, their metadata (timestamps), no re-sampling.

    ``size``: the video processor's ``{"shortest_edge", "longest_edge"}`` total pixel budget per video
    (summed over its sampled frames), when it should differ from the processor's own.
    """
    kwargs: dict[str, Any] = {
        "videos": [v.frames for v in videos],
        # copies: the processor writes into the metadata (and pads frames_indices in place)
        "video_metadata": [replace(v.metadata, frames_indices=list(v.metadata.frames_indices)) for v in videos],
        "do_sample_frames": False,
    }
    if size:
        kwargs["videos_kwargs"] = {"size": size}
    return kwargs
