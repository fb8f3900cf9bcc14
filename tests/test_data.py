"""Datasets (save_to_disk / JSONL), bad input handling, and the processor collate."""

from __future__ import annotations

import io
import json

import pytest
import torch

from nemo_bard.data.collate import bard_collate_fn, split_last_turn
from nemo_bard.data.datasets import BardChatDataset, DataError
from tests.conftest import random_image


def _row(image="images/a.png", answer="red", **extra):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return {"messages": msgs, **extra}


@pytest.fixture()
def data_dir(tmp_path):
    (tmp_path / "images").mkdir()
    random_image(0).save(tmp_path / "images" / "a.png")
    random_image(1, 64, 96).save(tmp_path / "images" / "b.png")
    return tmp_path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_last_turn():
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nold<|im_end|>\n<|im_start|>user\nq<|im_end|>\n" \
           "<|im_start|>assistant\n\n\nnew answer<|im_end|>\n"
    prefix, resp = split_last_turn(text)
    assert prefix.endswith("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")
    assert "old<|im_end|>" in prefix  # earlier turns stay in the prefix
    assert resp == "new answer<|im_end|>"  # repeated newlines collapsed, first <|im_end|> included


def test_jsonl_dataset_skips_rows_without_response(data_dir):
    rows = [_row(), _row(answer=""), {"messages": [{"role": "user", "content": "hi"}]}, _row(image="images/b.png")]
    ds = BardChatDataset(str(_write_jsonl(data_dir / "d.jsonl", rows)))
    assert len(ds) == 2 and ds.num_skipped_no_response == 2
    item = ds[1]
    assert item["row"] == 3 and item["conversation"][1]["content"][0]["image"].size == (96, 64)


def test_save_to_disk_with_json_messages_and_length(data_dir):
    from datasets import Dataset

    rows = [
        {"messages": json.dumps(_row()["messages"]), "length": 30},
        {"messages": json.dumps(_row(image="images/b.png")["messages"]), "length": 10},
    ]
    Dataset.from_list(rows).save_to_disk(str(data_dir / "arrow"))
    ds = BardChatDataset(str(data_dir / "arrow"), root_dir=str(data_dir))
    assert len(ds) == 2 and ds.lengths == [30, 10]
    assert ds[0]["conversation"][1]["content"][0]["image"].size == (64, 64)
    assert ds[1]["conversation"][2]["content"][0]["text"] == "red"


def test_save_to_disk_with_list_messages_and_image_bytes(data_dir):
    from datasets import Dataset

    buf = io.BytesIO()
    random_image(3, 32, 96).save(buf, format="PNG")
    msgs = [
        {"role": "user", "content": [{"type": "image", "text": None, "image": {"bytes": buf.getvalue(), "path": None}},
                                     {"type": "text", "text": "Colour?", "image": None}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue", "image": None}]},
    ]
    Dataset.from_list([{"messages": msgs}]).save_to_disk(str(data_dir / "arrow_bytes"))
    ds = BardChatDataset(str(data_dir / "arrow_bytes"))
    item = ds[0]
    assert item["conversation"][0]["content"][0]["image"].size == (96, 32)
    assert item["conversation"][1]["content"][0]["text"] == "blue"


def test_missing_image_error_names_row_and_path(data_dir):
    path = _write_jsonl(data_dir / "d.jsonl", [_row(), _row(image="images/missing.png")])
    ds = BardChatDataset(str(path))
    with pytest.raises(DataError, match=r"row 1: image file .*missing.png not found"):
        ds[1]
    skipping = BardChatDataset(str(path), skip_bad_samples=True)
    assert skipping[1] is None and skipping.num_skipped_media == 1


def test_image_of_extreme_aspect_ratio_is_a_named_row_error_or_a_counted_skip(data_dir, tiny_processor):
    random_image(2, 1, 10000).save(data_dir / "images" / "strip.png")
    path = _write_jsonl(data_dir / "d.jsonl", [_row(), _row(image="images/strip.png"), _row(image="images/b.png")])
    with pytest.raises(DataError, match=r"d.jsonl row 1: image .*strip.png is 10000x1 pixels, an aspect ratio above"):
        BardChatDataset(str(path))[1]
    skipping = BardChatDataset(str(path), skip_bad_samples=True)
    batch = bard_collate_fn([skipping[i] for i in range(3)], tiny_processor)  # the row is skipped, not a crash
    assert batch["num_skipped"] == 1 and batch["rows"].tolist() == [0, 2] and skipping.num_skipped_media == 1


def test_empty_dataset_and_bad_rows_are_clear_errors(data_dir):
    with pytest.raises(DataError, match="no usable rows"):
        BardChatDataset(str(_write_jsonl(data_dir / "e.jsonl", [_row(answer="")])))
    with pytest.raises(DataError, match="does not exist"):
        BardChatDataset(str(data_dir / "nope.jsonl"))
    (data_dir / "bad.jsonl").write_text('{"messages": []}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        BardChatDataset(str(data_dir / "bad.jsonl"))
    with pytest.raises(DataError, match="unknown role"):
        BardChatDataset(str(_write_jsonl(data_dir / "r.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])))


def test_jsonl_through_load_dataset_gives_the_rows_of_the_file(data_dir):
    """`datasets.load_dataset("json")` reads the same rows a line-by-line json.loads does (mixed content types,
    optional columns)."""
    rows = [_row(length=5), {"messages": [{"role": "user", "content": "plain text"},
                                          {"role": "assistant", "content": "blue"}]}, _row(image="images/b.png")]
    path = data_dir / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = BardChatDataset(str(path))
    expected = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert [ds.table[i]["messages"] for i in range(3)] == [r["messages"] for r in expected]
    assert [ds.table[i]["length"] for i in range(3)] == [5, None, None] and ds.lengths is None
    assert ds[1]["conversation"] == expected[1]["messages"]


def test_bad_rows_name_file_and_row(data_dir):
    """A 0-row save_to_disk dataset, a `messages` string that is not JSON (JSONL or save_to_disk),
    an empty JSONL file: one DataError naming the file and row, never a raw IndexError / JSONDecodeError."""
    from datasets import Dataset

    Dataset.from_dict({"messages": []}).save_to_disk(str(data_dir / "zero"))
    with pytest.raises(DataError, match=f"dataset {data_dir / 'zero'} has 0 rows"):
        BardChatDataset(str(data_dir / "zero"))
    good = json.dumps(_row()["messages"])
    Dataset.from_list([{"messages": good}, {"messages": good[:-5]}]).save_to_disk(str(data_dir / "broken"))
    with pytest.raises(DataError, match=r"broken row 1: 'messages' is a string but not valid JSON"):
        BardChatDataset(str(data_dir / "broken"))
    _write_jsonl(data_dir / "s.jsonl", [{"messages": good}, {"messages": good}, {"messages": "[{oops"}])
    with pytest.raises(DataError, match=r"s.jsonl row 2: 'messages' is a string but not valid JSON"):
        BardChatDataset(str(data_dir / "s.jsonl"))
    path = data_dir / "gap.jsonl"  # a blank line between rows whose content types differ: named, not a crash
    path.write_text(json.dumps(_row()) + "\n\n" + json.dumps({"messages": [{"role": "assistant", "content": "x"}]}))
    with pytest.raises(DataError, match="gap.jsonl:2: blank line; remove blank lines"):
        BardChatDataset(str(path))
    (data_dir / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        BardChatDataset(str(data_dir / "empty.jsonl"))


def test_collate_prefix_response_and_skips(data_dir, tiny_processor):
    ds = BardChatDataset(str(_write_jsonl(data_dir / "d.jsonl", [_row(answer="12 34"), _row(image="images/b.png")])))
    tok = tiny_processor.tokenizer
    batch = bard_collate_fn([ds[0], None, ds[1]], tiny_processor)
    assert batch["num_skipped"] == 1
    assert batch["prefix_ids"].shape[0] == 2 and batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for i in range(2):
        p = int(batch["prefix_lens"][i])
        assert batch["prefix_ids"][i, p - len(header) : p].tolist() == header
    r0 = batch["response_ids"][0, : batch["response_lens"][0]].tolist()
    assert tok.decode(r0) == "12 34<|im_end|>"
    assert batch["response_ids"][1, batch["response_lens"][1] :].eq(-1).all()
    n_img_tokens = (batch["prefix_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum(-1)
    assert n_img_tokens.tolist() == [4, 6]
    assert batch["pixel_values"].shape[0] == 16 + 24


def test_collate_respects_max_pixels(data_dir, tiny_processor):
    ds = BardChatDataset(str(_write_jsonl(data_dir / "d.jsonl", [_row(image="images/b.png")])))
    small = bard_collate_fn([ds[0]], tiny_processor, max_pixels=32 * 32)
    assert int(small["image_grid_thw"].prod()) <= 4


def _video_row(video, answer="colours change"):
    return {"messages": [
        {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


def test_video_rows_through_collate_layout_and_model(data_dir, coded_clip, tiny_processor, tiny_bard_model):
    """Video file + frame directory + image + text rows go through the dataset, collate, layout and a forward."""
    from nemo_bard.data.layout import BlockLayout
    from nemo_bard.data.media import VideoSource

    frames = data_dir / "clip"
    frames.mkdir()
    for i in range(4):
        random_image(10 + i).save(frames / f"{i:03d}.png")
    text_row = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}]}
    rows = [_video_row("clip"), _row(), _video_row(str(coded_clip)), text_row]
    ds = BardChatDataset(str(_write_jsonl(data_dir / "v.jsonl", rows)))
    src = ds[2]["conversation"][0]["content"][0]["video"]
    assert isinstance(src, VideoSource) and src.path == coded_clip  # checked, decoded by the collate
    batch = bard_collate_fn([ds[i] for i in range(4)], tiny_processor)  # the processor's 2 fps, [2, 8] frames
    # frame dir: 4 frames at 2 fps -> t = 2; the 3-s clip at 10 fps -> 6 frames -> t = 3
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [3, 4, 4]]
    assert batch["n_videos_per_sample"].tolist() == [1, 0, 1, 0] and batch["image_grid_thw"].shape[0] == 1
    prompt = tiny_processor.tokenizer.decode(batch["prefix_ids"][2, : batch["prefix_lens"][2]])
    # timestamps of frames (0, 6), (12, 17), (23, 29) at 10 fps, as Qwen3-VL writes them
    assert [t for t in ("<0.3 seconds>", "<1.4 seconds>", "<2.6 seconds>") if t in prompt] == [
        "<0.3 seconds>", "<1.4 seconds>", "<2.6 seconds>"]
    tenth = bard_collate_fn([ds[2]], tiny_processor, video_fps=1, video_max_frames=2)
    assert tenth["video_grid_thw"].tolist() == [[1, 4, 4]]  # collate kwargs override the processor's sampling
    layout = BlockLayout(block_size=4, mask_token_id=tiny_bard_model.config.mask_token_id,
                         pad_token_id=tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    built = layout.build(batch, [0, 1, 2, 3], tiny_bard_model.rope_positions)
    with torch.no_grad():
        out = tiny_bard_model(**built.inputs, logits_mask=built.loss_mask)
    assert out.logits.shape[0] == int(built.loss_mask.sum()) and torch.isfinite(out.logits).all()
    # video frames get 3-D positions: the temporal axis differs from the spatial ones somewhere in the prefix
    pos = built.inputs["position_ids"][:, 0]
    assert not torch.equal(pos[0], pos[1])


def test_ar_sft_collate_takes_video_rows(data_dir, coded_clip, tiny_processor):
    """NeMo's AR collate gets decoded frames (it cannot read our VideoSource) and runs the video processor."""
    from nemo_bard.integrations.nemo import ar_sft_collate_fn

    ds = BardChatDataset(str(_write_jsonl(data_dir / "v.jsonl", [_video_row(str(coded_clip)), _row()])))
    batch = ar_sft_collate_fn([ds[0], ds[1]], tiny_processor)
    assert batch["video_grid_thw"].shape[0] == 1 and batch["image_grid_thw"].shape[0] == 1
    assert batch["labels"].shape == batch["input_ids"].shape


def test_bad_video_rows_name_row_and_file(data_dir, coded_clip, tiny_processor):
    (data_dir / "bad.mp4").write_bytes(b"\x00" * 100)
    rows = [_video_row(str(coded_clip)), _video_row("clips/missing.mp4"), _video_row("bad.mp4")]
    path = _write_jsonl(data_dir / "v.jsonl", rows)
    ds = BardChatDataset(str(path))
    with pytest.raises(DataError, match=r"v.jsonl row 1: video file .*clips/missing.mp4 not found"):
        ds[1]
    with pytest.raises(DataError, match=rf"v.jsonl row 2: cannot open video {data_dir / 'bad.mp4'} as a video file"):
        bard_collate_fn([ds[0], ds[2]], tiny_processor)  # decoding happens in the collate
    skipping = BardChatDataset(str(path), skip_bad_samples=True)
    batch = bard_collate_fn([skipping[i] for i in range(3)], tiny_processor)
    assert batch["num_skipped"] == 2 and batch["rows"].tolist() == [0] and skipping.num_skipped_media == 1


def test_long_video_sampled_down_to_max_length(data_dir, tiny_processor):
    """A 30-s clip: fewer frames (same frame size) until prompt + 2 x padded response fits; else a clear error."""
    from nemo_bard.data.synthetic import write_video
    from tests.conftest import coded_frames

    write_video(data_dir / "long.mp4", coded_frames(120, 64, 96), fps=4)
    ds = BardChatDataset(str(_write_jsonl(data_dir / "l.jsonl", [_video_row("long.mp4", "a long clip"), _row()])))
    full = bard_collate_fn([ds[0]], tiny_processor, video_max_frames=64)
    assert full["video_grid_thw"].tolist() == [[30, 2, 4]] and int(full["prefix_lens"][0]) > 200
    fit = bard_collate_fn([ds[0], ds[1]], tiny_processor, video_max_frames=64, max_length=200, max_block_size=8)
    r_pad = (int(fit["response_lens"][0]) + 7) // 8 * 8
    assert fit["video_grid_thw"].tolist() == [[9, 2, 4]]  # 18 of 60 frames, each still 32 x 64 pixels
    assert int(fit["prefix_lens"][0]) + 2 * r_pad <= 200 and fit["image_grid_thw"].shape[0] == 1
    # the fit is the largest: one more temporal patch (20 frames at the same size) would not fit
    from nemo_bard.data.collate import _resize_frames
    from nemo_bard.data.media import VideoSampling, load_video

    video = _resize_frames(load_video(data_dir / "long.mp4", VideoSampling(2, 2, 64)).subsample(20), 32, 64)
    row = {"conversation": [{**m, "content": [{**it, "video": video} if it.get("type") == "video" else it
                                              for it in m["content"]]} for m in ds[0]["conversation"]]}
    one_more = bard_collate_fn([row], tiny_processor)
    assert one_more["video_grid_thw"].tolist() == [[10, 2, 4]] and int(one_more["prefix_lens"][0]) + 2 * r_pad > 200
    with pytest.raises(DataError, match=r"l.jsonl row 0: video .*long.mp4 does not fit max_length=60"):
        bard_collate_fn([ds[0], ds[1]], tiny_processor, video_max_frames=64, max_length=60, max_block_size=8)
    skipping = BardChatDataset(str(data_dir / "l.jsonl"), skip_bad_samples=True)
    batch = bard_collate_fn([skipping[0], skipping[1]], tiny_processor, video_max_frames=64, max_length=60,
                            max_block_size=8)
    assert batch["num_skipped"] == 1 and batch["rows"].tolist() == [1] and "video_grid_thw" not in batch


def test_fake_media_is_isolated(data_dir, tiny_processor, tiny_bard_model):
    """A fake image appended for FSDP keeps every real logit unchanged and runs the vision tower."""
    from nemo_bard.data.layout import BlockLayout, FakeMedia

    text_row = {"messages": [{"role": "user", "content": "Name a colour."},
                             {"role": "assistant", "content": "red and blue"}]}
    ds = BardChatDataset(str(_write_jsonl(data_dir / "t.jsonl", [text_row])))
    batch = bard_collate_fn([ds[0]], tiny_processor)
    cfg = tiny_bard_model.config
    layout = BlockLayout(block_size=4, mask_token_id=cfg.mask_token_id,
                         pad_token_id=tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    plain = layout.build(batch, [0], tiny_bard_model.rope_positions)
    fake = layout.build(batch, [0], tiny_bard_model.rope_positions, [FakeMedia.for_model(cfg, 1)])
    assert fake.inputs["input_ids"].shape[1] == plain.inputs["input_ids"].shape[1] + 1
    assert fake.inputs["input_ids"][0, -1] == cfg.image_token_id and fake.inputs["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert not fake.inputs["attention_mask"][0, 0, :-1, -1].any()  # nothing attends the fake token
    calls = []
    hook = tiny_bard_model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        a = tiny_bard_model(**plain.inputs, logits_mask=plain.loss_mask).logits
        b = tiny_bard_model(**fake.inputs, logits_mask=fake.loss_mask).logits
    hook.remove()
    assert calls == [1]  # only the fake-media forward ran the vision tower
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
