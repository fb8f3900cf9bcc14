"""Image / video loading and Qwen3-VL frame sampling (``nemo_bard.data.media``), in-process."""

from __future__ import annotations

import io

import numpy as np
import pytest

from nemo_bard.data.media import (
    MediaError,
    VideoDecoderMissing,
    VideoSampling,
    load_image,
    load_video,
    video_source,
)
from nemo_bard.data.synthetic import write_video
from tests.conftest import coded_frames, frame_codes, random_image


@pytest.mark.parametrize("fps,min_frames,max_frames", [(2, 4, 768), (1, 2, 8), (0.5, 1, 3), (4, 4, 16)])
def test_sampling_is_qwen3vl_sample_frames(fps, min_frames, max_frames):
    from transformers import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    qwen = Qwen3VLVideoProcessor(fps=fps, min_frames=min_frames, max_frames=max_frames)
    ours = VideoSampling(fps, min_frames, max_frames)
    for total in (2, 3, 5, 30, 299, 300, 2000):
        for video_fps in (1.0, 10.0, 29.97, 30.0):
            expected = qwen.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps))
            if len(expected) == 1:  # ours shows one frame as a full temporal patch
                expected = np.repeat(expected, 2)
            np.testing.assert_array_equal(ours.indices(total, video_fps), expected)


def test_sampling_counts():
    assert VideoSampling().indices(300, 30.0).tolist() == np.linspace(0, 299, 20).round().astype(int).tolist()
    assert len(VideoSampling(max_frames=8).indices(300, 30.0)) == 8  # 10 s at 2 fps, capped
    assert VideoSampling().indices(3, 30.0).tolist() == [0, 1, 2]  # min_frames 4, but only 3 frames exist
    assert VideoSampling().indices(1, 30.0).tolist() == [0, 0]  # one temporal patch


def test_sampling_from_processor(tiny_processor):
    vp = tiny_processor.video_processor  # fps 2, frames in [2, 8]
    assert VideoSampling.from_processor(vp) == VideoSampling(2.0, 2, 8)
    assert VideoSampling.from_processor(vp, fps=4, max_frames=16) == VideoSampling(4.0, 2, 16)
    assert VideoSampling.from_processor(None, max_frames=2) == VideoSampling(2.0, 2, 2)  # min follows max down


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv"])
def test_decode_samples_exact_frames(tmp_path, suffix):
    """3 s at 10 fps: 2 fps gives frames 0, 6, 12, 17, 23, 29 (webm/mkv headers carry no frame count)."""
    path = write_video(tmp_path / f"clip{suffix}", coded_frames(30), fps=10)
    video = load_video(path, VideoSampling(fps=2))
    expected = [0, 6, 12, 17, 23, 29]
    assert video.frames.shape == (6, 48, 64, 3) and video.frames.dtype == np.uint8
    assert frame_codes(video.frames) == expected
    meta = video.metadata
    assert (meta.total_num_frames, meta.fps, meta.frames_indices, meta.video_backend) == (30, 10.0, expected, "pyav")
    assert meta.duration == pytest.approx(3.0, abs=0.15) and (meta.width, meta.height) == (64, 48)
    assert meta.timestamps == pytest.approx([i / 10 for i in expected])


def test_decode_sparse_frames_across_keyframes(tmp_path):
    """120 frames, a keyframe every 10: four sampled frames come from four keyframe intervals (seeking)."""
    path = write_video(tmp_path / "long.mp4", coded_frames(120), fps=30, g="10")
    video = load_video(path, VideoSampling(fps=2, min_frames=1, max_frames=4))
    assert video.metadata.frames_indices == [0, 40, 79, 119]
    assert frame_codes(video.frames) == [i % 32 for i in (0, 40, 79, 119)]


def test_sampled_frames_exact_when_skipping_unreferenced_ones(tmp_path):
    """Unsampled frames nobody references (H.264 B-frames) are skipped; sampled ones never are."""
    import av

    frames = coded_frames(90)
    for i, f in enumerate(frames):  # motion, so the encoder uses B-frames
        f[:10, (2 * i) % 54:(2 * i) % 54 + 10] = 255
    path = write_video(tmp_path / "b.mp4", frames, fps=30)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        assert sum(1 for _ in container.decode(stream)) < 90  # the clip has unreferenced frames
    for fps in (1, 2, 3, 7, 13, 30):
        video = load_video(path, VideoSampling(fps=fps, min_frames=1, max_frames=90))
        assert len(video) == 3 * fps
        assert frame_codes(f[10:] for f in video.frames) == [i % 32 for i in video.metadata.frames_indices]


def test_video_bytes_frame_dir_and_frame_list(coded_clip, tmp_path):
    from PIL import Image

    from_bytes = load_video({"bytes": coded_clip.read_bytes()}, VideoSampling(fps=2))
    assert frame_codes(from_bytes.frames) == [0, 6, 12, 17, 23, 29] and from_bytes.source.name == "<video bytes>"
    frames = tmp_path / "clip"
    frames.mkdir()
    for i, f in enumerate(coded_frames(10)):
        Image.fromarray(f).save(frames / f"{i:03d}.png")
    # a frame directory is a clip at `fps` frames per second: all 10 frames, or 4 evenly spaced ones
    assert frame_codes(load_video(frames, VideoSampling(fps=2)).frames) == list(range(10))
    capped = load_video("clip", VideoSampling(fps=2, max_frames=4), root_dir=tmp_path)
    assert frame_codes(capped.frames) == [0, 3, 6, 9] and capped.metadata.frames_indices == [0, 3, 6, 9]
    assert capped.metadata.fps == 2.0 and capped.metadata.total_num_frames == 10
    listed = load_video([f"clip/{i:03d}.png" for i in range(5)], VideoSampling(fps=2), root_dir=tmp_path)
    assert frame_codes(listed.frames) == [0, 1, 2, 3, 4]
    pil = load_video([Image.fromarray(f) for f in coded_frames(2)], VideoSampling(fps=2))
    assert frame_codes(pil.frames) == [0, 1]
    with pytest.raises(MediaError, match="the frames of video <list of 2 frames> differ in size"):
        load_video([random_image(0, 32, 32), random_image(1, 32, 48)])


def test_one_frame_clip_is_two_frames(tmp_path):
    video = load_video(write_video(tmp_path / "one.mp4", coded_frames(1), fps=5))
    assert video.metadata.frames_indices == [0, 0] and frame_codes(video.frames) == [0, 0]


def test_subsample_keeps_source_indices(coded_clip):
    video = load_video(coded_clip, VideoSampling(fps=2))
    fewer = video.subsample(4)
    assert fewer.metadata.frames_indices == [0, 12, 17, 29] and frame_codes(fewer.frames) == [0, 12, 17, 29]
    assert video.metadata.frames_indices == [0, 6, 12, 17, 23, 29]  # the original is untouched


def _zero_frame_webm(tmp_path):
    """A webm whose header declares a video track but whose first cluster holds no frame."""
    data = write_video(tmp_path / "one.webm", coded_frames(3, 32, 32), fps=10).read_bytes()
    path = tmp_path / "zero.webm"
    path.write_bytes(data[: data.index(bytes.fromhex("1F43B675")) + 4])  # cut right after the Cluster id
    return path


def _audio_only(tmp_path):
    import av

    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("case", ["missing", "not_a_video", "truncated", "zero_frames", "audio_only"])
def test_bad_videos_name_the_file(case, coded_clip, tmp_path):
    if case == "missing":
        ref, expected = "clips/nope.mp4", f"video file {tmp_path / 'clips/nope.mp4'} not found (relative paths"
    elif case == "not_a_video":  # a container FFmpeg does not know
        ref = tmp_path / "notes.mkv"
        ref.write_text("these are notes, not a video\n" * 20)
        expected = f"cannot open video {ref} as a video file (Invalid data found"
    elif case == "truncated":  # mp4 whose index (moov, written last) is cut off
        ref = tmp_path / "cut.mp4"
        ref.write_bytes(coded_clip.read_bytes()[:2000])
        expected = f"cannot open video {ref} as a video file"
    elif case == "zero_frames":
        ref = _zero_frame_webm(tmp_path)
        expected = f"video {ref} holds no frames"
    else:
        ref = _audio_only(tmp_path)
        expected = f"video {ref} has no video stream"
    with pytest.raises(MediaError) as err:
        load_video(ref, root_dir=tmp_path)
    assert expected in str(err.value)


def test_missing_pyav_names_the_extra(coded_clip, tmp_path, monkeypatch):
    monkeypatch.setattr("transformers.utils.is_av_available", lambda: False)
    hint = r"needs PyAV: pip install 'nemo-bard\[video\]'"
    with pytest.raises(VideoDecoderMissing, match=r"video file .*coded.mp4 " + hint):
        video_source(coded_clip)
    with pytest.raises(VideoDecoderMissing, match=r"video bytes needs PyAV"):
        video_source({"bytes": b"..."})
    random_image(0).save(tmp_path / "0.png")
    assert len(load_video(tmp_path).frames) == 2  # frame directories need no decoder


def test_load_image_forms(tmp_path):
    img = random_image(1, 32, 48)
    img.save(tmp_path / "a.png")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    for ref, root in (("a.png", tmp_path), (str(tmp_path / "a.png"), None), ({"path": "a.png"}, tmp_path),
                      ({"bytes": buf.getvalue(), "path": None}, None), (img, None), (np.asarray(img), None)):
        out = load_image(ref, root)
        assert out.mode == "RGB" and out.size == (48, 32)
    with pytest.raises(MediaError, match=f"image file {tmp_path / 'b.png'} not found"):
        load_image("b.png", tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(MediaError, match=f"cannot read image {tmp_path / 'bad.png'}"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(MediaError, match="image bytes are not a readable image"):
        load_image({"bytes": b"xx"})


def test_image_shape_the_processor_refuses_is_named(tmp_path, tiny_processor):
    """An aspect ratio above 200:1 is a MediaError naming the file in every form; 200:1 itself still processes."""
    strip = random_image(0, 1, 10000)
    strip.save(tmp_path / "strip.png")
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    with pytest.raises(MediaError, match=f"image {tmp_path / 'strip.png'} is 10000x1 pixels, an aspect ratio above"):
        load_image("strip.png", tmp_path)
    for ref in ({"bytes": buf.getvalue()}, strip, np.asarray(strip)):
        with pytest.raises(MediaError, match="is 10000x1 pixels, an aspect ratio above the 200:1"):
            load_image(ref)
    with pytest.raises(ValueError, match="aspect ratio"):  # what the processor itself does with it
        tiny_processor.image_processor(images=[strip])
    edge = load_image(random_image(1, 1, 200))
    assert tiny_processor.image_processor(images=[edge])["pixel_values"].shape[0] > 0

