"""The offline digits-OCR dataset: split by source scan, determinism, chat format, one token per digit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nemo_bard.data import digits
from nemo_bard.data.datasets import BardChatDataset


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    digits.write_digits_dataset(root, train=40, test=20, seed=0)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_split_by_source_scan():
    scans = digits.load_scans()
    train = digits.make_samples("train", 400, seed=3, scans=scans)
    test = digits.make_samples("test", 200, seed=3, scans=scans)
    train_ids = {i for s in train for i in s.scan_ids}
    test_ids = {i for s in test for i in s.scan_ids}
    assert train_ids <= set(digits.TRAIN_POOL) and test_ids <= set(digits.TEST_POOL)
    assert not train_ids & test_ids
    assert min(test_ids) >= 1437 and max(train_ids) < 1437
    labels = scans[1]
    for s in train[:50] + test[:50]:
        assert s.answer == "".join(str(labels[i]) for i in s.scan_ids)
        assert 4 <= len(s.answer) <= 12 and s.answer.isdigit()
        assert s.pixels.shape == (32, 32 * len(s.answer), 3) and s.pixels.dtype == np.uint8


def test_written_rows_respect_the_split(digits_dir):
    from datasets import load_from_disk

    for split, pool in (("train", digits.TRAIN_POOL), ("test", digits.TEST_POOL)):
        table = load_from_disk(str(digits_dir / split))
        assert set(table.column_names) >= {"messages", "answer", "length", "v_tokens", "scan_ids"}
        for row in table:
            assert all(i in pool for i in row["scan_ids"])
            assert row["v_tokens"] == len(row["answer"]) == row["num_digits"]


def test_deterministic_from_seed(tmp_path):
    a = digits.write_digits_dataset(tmp_path / "a", train=12, test=6, seed=7)["root"]
    b = digits.write_digits_dataset(tmp_path / "b", train=12, test=6, seed=7)["root"]
    c = digits.write_digits_dataset(tmp_path / "c", train=12, test=6, seed=8)["root"]
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)  # byte-identical
    assert any(fa[k] != fc.get(k) for k in fa if k.startswith("images/"))


def test_readable_by_bard_chat_dataset(digits_dir):
    ds = BardChatDataset(path=str(digits_dir / "train"), root_dir=str(digits_dir))
    assert len(ds) == 40 and ds.lengths is not None
    item = ds[0]
    user, assistant = item["conversation"]
    image = user["content"][0]["image"]
    assert user["content"][1] == {"type": "text", "text": digits.PROMPT}
    answer = assistant["content"][0]["text"]
    assert answer == ds.table[item["row"]]["answer"] and " " not in answer
    assert image.mode == "RGB" and image.size == (32 * len(answer), 32)
    raw = json.loads(ds.table[0]["messages"])
    assert raw[0]["content"][0]["image"] == "images/train_00000.png"


def test_jsonl_format_and_cli(tmp_path, capsys):
    digits.main([str(tmp_path), "--train", "5", "--test", "3", "--format", "jsonl", "--min-digits", "2",
                 "--max-digits", "3", "--seed", "1"])
    assert "wrote 5 train / 3 test" in capsys.readouterr().out
    ds = BardChatDataset(path=str(tmp_path / "test.jsonl"))  # root defaults to the file's folder
    assert len(ds) == 3
    for i in range(3):
        answer = ds[i]["conversation"][1]["content"][0]["text"]
        assert 2 <= len(answer) <= 3
    assert json.loads((tmp_path / "digits_config.json").read_text())["test_pool"] == [1437, 1797]


def test_one_visual_token_and_one_text_token_per_digit(digits_dir, tiny_processor):
    ds = BardChatDataset(path=str(digits_dir / "test"), root_dir=str(digits_dir))
    item = ds[0]
    answer = item["conversation"][1]["content"][0]["text"]
    text = tiny_processor.apply_chat_template(item["conversation"][:1], tokenize=False, add_generation_prompt=True)
    batch = tiny_processor(text=[text], images=[item["conversation"][0]["content"][0]["image"]], return_tensors="pt")
    merge = tiny_processor.image_processor.merge_size
    assert int(batch["image_grid_thw"].prod()) // merge**2 == len(answer)
    image_pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_pad).sum()) == len(answer)
    assert len(tiny_processor.tokenizer(answer)["input_ids"]) == len(answer)


@pytest.mark.parametrize("drawn, expected", [("4739", "0123"), ("2468", "0000"), ("13579135791", "12345678901"),
                                             ("102030405", "111122223"), ("8", "0")])
def test_odd_count_answers_by_hand(drawn, expected):
    """Answer token j counts the odd digits among the first j (mod 10): the previous token, plus one if d_j is odd."""
    assert digits.task_answer("odd_count", drawn) == expected
    assert digits.task_answer("read", drawn) == drawn
    with pytest.raises(ValueError, match="task 'sort'"):
        digits.task_answer("sort", drawn)


def test_odd_count_task_draws_the_same_images(tmp_path):
    scans = digits.load_scans()
    read = digits.make_samples("test", 30, seed=5, scans=scans)
    counts = digits.make_samples("test", 30, seed=5, scans=scans, task="odd_count")
    labels = scans[1]
    for r, c in zip(read, counts):
        assert r.scan_ids == c.scan_ids and np.array_equal(r.pixels, c.pixels)
        assert c.digits == r.answer == "".join(str(labels[i]) for i in c.scan_ids)
        assert len(c.answer) == len(c.digits) and c.answer.isdigit()
        assert int(c.answer[-1]) == sum(int(d) % 2 for d in c.digits) % 10  # the last token: all odd digits
    assert sum(r.answer != c.answer for r, c in zip(read, counts)) >= 25  # a different answer, not a relabelling
    digits.main([str(tmp_path), "--task", "odd_count", "--train", "4", "--test", "2", "--format", "jsonl"])
    ds = BardChatDataset(path=str(tmp_path / "train.jsonl"))
    user, assistant = ds[0]["conversation"]
    row = ds.table[0]
    assert user["content"][1]["text"] == digits.TASKS["odd_count"] != digits.PROMPT
    assert assistant["content"][0]["text"] == row["answer"] == digits.task_answer("odd_count", row["digits"])
    assert row["task"] == "odd_count"
    assert json.loads((tmp_path / "digits_config.json").read_text())["task"] == "odd_count"


def test_dev_split_shows_held_out_scans_and_never_a_test_row(tmp_path):
    # one-digit rows: only 360 held-out sequences, so the test rows' sequences would recur in dev if not skipped
    paths = digits.write_digits_dataset(tmp_path, train=0, test=150, dev=60, seed=2, min_digits=1, max_digits=1,
                                        fmt="jsonl")
    rows = {split: [json.loads(line) for line in paths[split].read_text().splitlines()] for split in ("test", "dev")}
    test_seqs = {tuple(r["scan_ids"]) for r in rows["test"]}
    dev_seqs = [tuple(r["scan_ids"]) for r in rows["dev"]]
    assert len(dev_seqs) == 60 and not test_seqs & set(dev_seqs)
    assert all(i in digits.TEST_POOL for seq in dev_seqs for i in seq)
    drawn = [tuple(s.scan_ids) for s in digits.make_samples("dev", 60, seed=2, min_digits=1, max_digits=1)]
    assert set(drawn) & test_seqs, "without the exclusion this stream would repeat test rows"
    assert json.loads((tmp_path / "digits_config.json").read_text())["dev"] == 60
