"""`eval --tune` and the decoding point a model directory carries: the choice rule on hand-made tables, the file
round trip and its backup, flags beating the stored default in every consumer, each bad input's one line, and a
tiny end-to-end search."""

from __future__ import annotations

import errno
import json
import shutil
from types import SimpleNamespace

import pytest

from nemo_bard.eval.tune import choose, default_grid, merge_rows, paired_difference, tune_table
from nemo_bard.generation.defaults import (
    BACKUP_SUFFIX,
    EVIDENCE_FILE,
    GENERATION_CONFIG,
    DecodingDefaults,
    DefaultsError,
    read_decoding_defaults,
    write_decoding_point,
)
from nemo_bard.generation.points import DecodePoint


def _row(point: str, acc: float, speed: float, n: int = 100, tpf: float = 2.0) -> dict:
    return {"point": point, "accuracy": acc, "n": n, "decode_tokens_per_second": speed, "tokens_per_forward": tpf}


# ------------------------------------------------------------------------------------------- the rule


def test_choose_takes_the_fastest_point_within_the_tolerance():
    ar = _row("AR", 0.660, 600)
    rows = [_row("t1.0", 0.670, 200, tpf=1.0), _row("t0.9", 0.652, 2400, tpf=6.8), _row("t0.7", 0.650, 2900, tpf=8.0),
            _row("t0.5", 0.640, 3500, tpf=9.0), _row("fast but partial", 0.700, 9000, n=25)]
    assert choose(rows, ar, 1.0)["point"] == "t0.7"  # 65.0 >= 66.0 - 1.0; t0.5 loses 2 points; partial rows don't count
    assert choose(rows, ar, 2.5)["point"] == "t0.5"
    assert choose(rows, ar, 0.5)["point"] == "t1.0"  # only the point that loses nothing
    assert choose(rows, ar, 1.0, "tokens_per_forward")["point"] == "t0.7"
    assert choose(rows[3:], ar, 1.0) is None  # none within the tolerance
    tie = [_row("a", 0.655, 1000), _row("b", 0.659, 1000)]
    assert choose(tie, ar, 1.0)["point"] == "b"  # equal speed: the more accurate
    with pytest.raises(ValueError, match="objective"):
        choose(rows, ar, 1.0, "accuracy")


def test_pooled_decode_speed_ranks_by_forwards_and_ties_go_to_the_careful_point():
    from nemo_bard.eval.tune import pool_decode_speed

    rows = [{"point": "t0.9", "threshold": 0.9, "denoising_steps": 16, "response_tokens": 80, "num_forwards": 10,
             "wall_time": 3.0, "prefill_time": 1.0, "accuracy": 0.5, "n": 4, "decode_tokens_per_second": 40.0},
            {"point": "t0.5", "threshold": 0.5, "denoising_steps": 16, "response_tokens": 80, "num_forwards": 10,
             "wall_time": 1.5, "prefill_time": 1.0, "accuracy": 0.5, "n": 4, "decode_tokens_per_second": 160.0},
            {"point": "t1", "threshold": 1.0, "denoising_steps": 16, "response_tokens": 80, "num_forwards": 40,
             "wall_time": 9.0, "prefill_time": 1.0, "accuracy": 0.5, "n": 4, "decode_tokens_per_second": 10.0}]
    assert pool_decode_speed(rows) == (2.0 + 0.5 + 8.0) / 60  # seconds per forward over all points
    assert rows[0]["pooled_decode_tokens_per_second"] == rows[1]["pooled_decode_tokens_per_second"]
    ar = {"accuracy": 0.5, "n": 4}
    # the same forwards and answers: the noisy own timing (160 vs 40 tokens/s) does not decide, the higher tau does
    assert choose(rows, ar, 0.0)["point"] == "t0.9"


def test_grid_paired_difference_and_merged_rows():
    grid = default_grid(16)
    assert [p.label for p in grid[:3]] == ["B16 S16 t1 static", "B16 S8 t1 static", "B16 S4 t1 static"]
    assert len(grid) == 8 and {p.denoising_steps for p in grid[3:]} == {16}
    assert len(default_grid(1)) == 1 + 5  # S = 1 only
    from nemo_bard.eval.tune import speed_bound

    assert [speed_bound(p) for p in grid[:4]] == [1.0, 2.0, 4.0, float("inf")]  # static: B/S tokens per forward

    def preds(bits):
        return [{"exact_match": float(b), "char_accuracy": 1.0, "position_accuracy": 1.0} for b in bits]

    ar = {"predictions": preds([1, 1, 0, 0])}
    mean, (lo, hi) = paired_difference({"predictions": preds([1, 0, 0, 1])}, ar)
    assert mean == 0.0 and lo < 0 < hi
    assert paired_difference({"predictions": preds([1, 1, 0, 0])}, ar) == (0.0, (0.0, 0.0))
    # exact match over both slices; speeds from the first (timed) slice only: the rest may run at another batch size
    first = {"n": 2, "response_tokens": 10, "num_forwards": 4, "row_forwards": 4, "wall_time": 1.0, "eval_time": 1.5,
             "prefill_time": 0.5, "tokens_per_forward": 2.5, "decode_tokens_per_second": 20.0,
             "predictions": preds([1, 1])}
    rest = {"n": 2, "response_tokens": 30, "num_forwards": 2, "row_forwards": 6, "wall_time": 0.2, "eval_time": 0.3,
            "prefill_time": 0.1, "tokens_per_forward": 5.0, "decode_tokens_per_second": 300.0,
            "predictions": preds([0, 1])}
    m = merge_rows(first, rest)
    assert (m["n"], m["speed_rows"], m["accuracy"], m["tokens_per_forward"], m["decode_tokens_per_second"]) == (
        4, 2, 0.75, 2.5, 20.0)
    assert (m["response_tokens"], m["num_forwards"], m["wall_time"]) == (10, 4, 1.0)
    assert [p["exact_match"] for p in m["predictions"]] == [1.0, 1.0, 0.0, 1.0]
    table = tune_table({**m, "decode_tokens_per_second": 10.0},
                       [{**m, "point": "B4 S4 t0.9", "status": "chosen", "delta": 0.0, "delta_ci95": (-0.1, 0.1)}])
    assert "| B4 S4 t0.9 | 4 | 75.0 [" in table and "| 2.00× | chosen |" in table


# --------------------------------------------------------------------------- the model directory's point


def test_write_keeps_other_keys_and_a_backup_and_reads_back(tmp_path):
    old = {"eos_token_id": 3, "pad_token_id": 2, "confidence_threshold": 0.9}
    (tmp_path / GENERATION_CONFIG).write_text(json.dumps(old))
    written = write_decoding_point(tmp_path, DecodePoint(16, 8, 0.7, "dynamic"), {"rows": 5})
    assert json.loads((tmp_path / (GENERATION_CONFIG + BACKUP_SUFFIX)).read_text()) == old
    data = json.loads((tmp_path / GENERATION_CONFIG).read_text())
    assert data["eos_token_id"] == 3 and data["pad_token_id"] == 2
    assert json.loads((tmp_path / EVIDENCE_FILE).read_text()) == {"rows": 5} and written["evidence"].is_file()
    stored = read_decoding_defaults(tmp_path)
    assert (stored.denoising_steps, stored.remasking_strategy, stored.confidence_threshold) == (
        8, "low_confidence_dynamic", 0.7)
    assert stored.point(16) == DecodePoint(16, 8, 0.7, "dynamic")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    assert read_decoding_defaults(tmp_path / "missing").empty


def test_explicit_values_beat_the_stored_point_field_by_field():
    stored = DecodingDefaults(8, "low_confidence_static", 1.0)
    assert stored.resolve(16) == (8, "low_confidence_static", 1.0)
    assert stored.resolve(16, denoising_steps=16) == (16, "low_confidence_static", 1.0)
    # an explicit tau alone brings its own strategy (dynamic below 1), not the stored static one
    assert stored.resolve(16, confidence_threshold=0.8) == (8, "low_confidence_dynamic", 0.8)
    assert stored.resolve(4) == (4, "low_confidence_static", 1.0)  # S clamped to a smaller --block-size
    assert DecodingDefaults().resolve(16) == (16, "low_confidence_dynamic", 0.9)
    assert DecodingDefaults().resolve(16, fallback_threshold=1.0) == (16, "low_confidence_static", 1.0)


@pytest.mark.parametrize("key,value", [("confidence_threshold", 1.5), ("denoising_steps", 0),
                                       ("remasking_strategy", "greedy")])
def test_a_bad_stored_value_names_the_file_and_the_field(tmp_path, key, value):
    (tmp_path / GENERATION_CONFIG).write_text(json.dumps({key: value}))
    with pytest.raises(DefaultsError, match=rf"{GENERATION_CONFIG}: {key} is"):
        read_decoding_defaults(tmp_path)


def test_generate_serve_eval_and_lmms_default_to_the_stored_point(tiny_bard_dir, tmp_path):
    from nemo_bard import generate, serve
    from nemo_bard.eval.evaluation import model_default_points
    from nemo_bard.eval.lmms.core import BardLmmsModel

    model = tmp_path / "m"
    shutil.copytree(tiny_bard_dir, model)
    write_decoding_point(model, DecodePoint(4, 2, 0.7, "dynamic"))
    cfg = json.loads((model / "config.json").read_text())

    def gen_args(*flags):
        args = generate.build_parser().parse_args(["--model", str(model), "--prompt", "p", *flags])
        generate.apply_model_defaults(args, cfg)
        return args.denoising_steps, args.remasking_strategy, args.confidence_threshold

    assert gen_args() == (2, "low_confidence_dynamic", 0.7)
    assert gen_args("--confidence-threshold", "1.0", "--denoising-steps", "4") == (4, "low_confidence_static", 1.0)
    stub = SimpleNamespace(config=SimpleNamespace(block_size=4))
    sargs = serve.build_parser().parse_args(["--model", str(model)])
    assert serve.decoding_defaults(stub, sargs) == (4, 2, "low_confidence_dynamic", 0.7)
    sargs = serve.build_parser().parse_args(["--model", str(model), "--confidence-threshold", "0.95"])
    assert serve.decoding_defaults(stub, sargs)[1:] == (2, "low_confidence_dynamic", 0.95)
    assert [p.label for p in model_default_points(model, 4)] == ["B4 S4 t1", "B4 S2 t0.7 dynamic"]
    assert [p.label for p in model_default_points(tiny_bard_dir, 4)] == ["B4 S4 t1", "B4 S4 t0.9"]
    assert BardLmmsModel(str(model)).point == DecodePoint(4, 2, 0.7, "dynamic")
    explicit = BardLmmsModel(str(model), confidence_threshold=1.0, denoising_steps=4)
    assert explicit.point == DecodePoint(4, 4, 1.0, "static")


def test_a_bad_stored_point_is_one_line_in_generate_and_serve(tiny_bard_dir, tmp_path, capsys):
    from nemo_bard import generate, serve

    model = tmp_path / "m"
    shutil.copytree(tiny_bard_dir, model)
    (model / GENERATION_CONFIG).write_text(json.dumps({"confidence_threshold": "high"}))
    assert generate.main(["--model", str(model), "--prompt", "p"]) == 2
    assert serve.main(["--model", str(model), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(f"{GENERATION_CONFIG}: confidence_threshold is 'high'" in line for line in err)


# ------------------------------------------------------------------------------------------ --tune runs


@pytest.fixture(scope="module")
def dev_data(tmp_path_factory):
    from nemo_bard.data.digits import write_digits_dataset

    root = tmp_path_factory.mktemp("tune_digits")
    write_digits_dataset(root, train=4, test=0, seed=3, min_digits=3, max_digits=4)
    return root / "train"


def _tune(model, ar, data, *extra):
    from nemo_bard.eval.__main__ import main

    out = [] if "--out-dir" in extra else ["--out-dir", ""]
    return main(["--tune", "--model", str(model), "--ar-model", str(ar), "--data", str(data), "--max-new-tokens",
                 "4", "--batch-size", "2", "--no-progress", *out, *extra])


def test_tune_end_to_end_writes_the_point_and_dry_run_writes_nothing(tiny_bard_dir, tiny_ar_dir, dev_data,
                                                                      tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_bard_dir, model)
    before = (model / GENERATION_CONFIG).read_text()
    assert _tune(model, tiny_ar_dir, dev_data, "--first-slice", "2", "--dry-run", "--points", "4:4:0.9,4:2:0.5") == 0
    out = capsys.readouterr().out
    assert "| AR | 4 |" in out and "| chosen |" in out and "--dry-run: nothing written" in out
    assert (model / GENERATION_CONFIG).read_text() == before and not (model / EVIDENCE_FILE).exists()

    assert _tune(model, tiny_ar_dir, dev_data, "--points", "4:4:1.0,4:2:0.9,4:1:1.0", "--first-slice", "2",
                 "--out-dir", str(tmp_path / "report")) == 0
    out = capsys.readouterr().out
    reported = json.loads((tmp_path / "report" / "results.json").read_text())["results"]
    assert reported[0]["kind"] == "ar" and 2 <= len(reported) <= 4  # AR and the points that ran
    evidence = json.loads((model / EVIDENCE_FILE).read_text())
    assert (model / (GENERATION_CONFIG + BACKUP_SUFFIX)).read_text() == before
    assert evidence["rows"] == 4 and evidence["dataset"] == str(dev_data.resolve()) and evidence["ar"]["n"] == 4
    # rows 3-4 ran at the rest batch size (8) for exact match only; the AR's answers equal a batch-1 evaluation's
    assert (evidence["speed_rows"], evidence["rest_batch_size"], evidence["batch_size"]) == (2, 8, 2)
    from nemo_bard.eval.evaluation import evaluate, load_samples

    solo = evaluate(tiny_ar_dir, load_samples(dev_data), max_new_tokens=4, batch_size=1, progress=False,
                    warmup=False)[0]["predictions"]
    ar_name = reported[0]["name"].replace(" ", "_")
    tuned_ar = [json.loads(line) for line in next((tmp_path / "report" / "predictions").glob(f"{ar_name}*"))
                .read_text().splitlines()]
    assert [p["prediction"] for p in tuned_ar] == [p["prediction"] for p in solo]
    assert evidence["chosen"]["n"] == 4 and "ar_model" in evidence and "date" in evidence
    stored = read_decoding_defaults(model).point(4)
    assert stored is not None and f"chose {stored.label}" in out
    statuses = [c["status"] for c in evidence["candidates"]]
    assert statuses.count("chosen") == 1 and len(statuses) == 3
    assert json.loads((model / GENERATION_CONFIG).read_text())["eos_token_id"] == json.loads(before)["eos_token_id"]


def test_no_point_within_the_tolerance_says_so_and_writes_nothing(tiny_bard_dir, tiny_ar_dir, dev_data, tmp_path,
                                                                   capsys):
    from nemo_bard.eval.evaluation import evaluate, load_samples

    # references = the AR model's own answers: AR scores 100 %, the untrained block decoder less
    from datasets import load_from_disk

    ar_rows = evaluate(tiny_ar_dir, load_samples(dev_data), max_new_tokens=4, batch_size=2, progress=False,
                       warmup=False)[0]["predictions"]
    table = load_from_disk(str(dev_data))
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps({"messages": table[p["row"]]["messages"], "answer": p["prediction"] or "x"})
                            + "\n" for p in ar_rows))
    model = tmp_path / "m"
    shutil.copytree(tiny_bard_dir, model)
    before = sorted(p.name for p in model.iterdir())
    assert _tune(model, tiny_ar_dir, data, "--points", "4:1:1.0", "--tolerance", "0",
                 "--root-dir", str(dev_data.parent)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # not load bars
    assert len(err) == 1 and "no decoding point is within 0 points of AR's exact match" in err[0]
    assert "nothing was written" in err[0] and sorted(p.name for p in model.iterdir()) == before


def test_bad_inputs_are_one_line_naming_the_file_or_flag(tiny_bard_dir, tiny_ar_dir, dev_data, tmp_path, capsys,
                                                         monkeypatch):
    def one_line(rc):
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not load bars
        assert rc == 2 and len(err) == 1, err
        return err[0]

    # a dev split without reference answers
    empty = tmp_path / "noref.jsonl"
    empty.write_text(json.dumps({"messages": json.dumps([{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": ""}])}) + "\n")
    line = one_line(_tune(tiny_bard_dir, tiny_ar_dir, empty))
    assert f"--data {empty}: no reference answers" in line and "'answer' column" in line
    empty.write_text(json.dumps({"messages": json.dumps([{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "x"}]), "answer": ""}) + "\n")
    line = one_line(_tune(tiny_bard_dir, tiny_ar_dir, empty))
    assert f"--data {empty}: no reference answers" in line and "empty reference" in line
    # an AR model whose tokenizer differs
    other = tmp_path / "other_ar"
    shutil.copytree(tiny_ar_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[5:7]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    line = one_line(_tune(tiny_bard_dir, other, dev_data))
    assert f"--ar-model {other}: its tokenizer differs" in line and "tokenizer.json" in line
    # a read-only model directory (simulated: root may write anywhere)
    import nemo_bard.generation.defaults as defaults

    def readonly(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(defaults.tempfile, "mkstemp", readonly)
    line = one_line(_tune(tiny_bard_dir, tiny_ar_dir, dev_data))
    assert f"--model {tiny_bard_dir} is read-only" in line and "--dry-run" in line
    monkeypatch.undo()
    # flags: an AR model as --model, a missing --ar-model, a grid at another block size, a negative tolerance
    assert "not 'bard_vl'" in one_line(_tune(tiny_ar_dir, tiny_ar_dir, dev_data))
    from nemo_bard.eval.__main__ import main

    assert "needs --ar-model" in one_line(main(["--tune", "--model", str(tiny_bard_dir), "--data", str(dev_data)]))
    assert "block size 4" in one_line(_tune(tiny_bard_dir, tiny_ar_dir, dev_data, "--points", "8:8:0.9", "--dry-run"))
    assert "--tolerance" in one_line(_tune(tiny_bard_dir, tiny_ar_dir, dev_data, "--tolerance", "-1"))
    assert "--rest-batch-size must be at least 1, got 0" in one_line(
        _tune(tiny_bard_dir, tiny_ar_dir, dev_data, "--rest-batch-size", "0"))


def test_points_evaluated_together_share_the_prefill_and_answer_alike(tiny_bard_dir, dev_data, monkeypatch):
    """--tune's first rung: the points of a group decode each batch from one prompt prefill; their rows equal
    evaluating each point alone, and each point's prefill time counts the shared prefill."""
    from nemo_bard.eval.evaluation import evaluate_point, evaluate_points, load_model, load_samples
    from nemo_bard.generation import DecodeEngine

    loaded = load_model(tiny_bard_dir, name="m")
    rows = load_samples(dev_data)
    points = [DecodePoint(4, 4, 1.0, "static"), DecodePoint(4, 2, 0.5, "dynamic"), DecodePoint(4, 4, 0.9, "dynamic")]
    alone = [evaluate_point(loaded, rows, p, batch_size=2, max_new_tokens=6, progress=False) for p in points]
    engine = DecodeEngine.for_model(loaded.model, loaded.engine)
    calls = []
    monkeypatch.setattr(engine, "prefill", lambda *a, _f=engine.prefill: calls.append(1) or _f(*a))
    together = evaluate_points(loaded, rows, points, batch_size=2, max_new_tokens=6, progress=False)
    assert len(calls) == -(-len(rows) // 2)  # one prompt forward per batch, not per point and batch
    for a, b in zip(alone, together):
        assert [p["prediction"] for p in a["predictions"]] == [p["prediction"] for p in b["predictions"]]
        assert (a["n"], a["num_forwards"], a["row_forwards"], a["response_tokens"], a["accuracy"]) == (
            b["n"], b["num_forwards"], b["row_forwards"], b["response_tokens"], b["accuracy"])
    first, *later = together
    assert all(r["prefill_time"] >= first["prefill_time"] > 0 for r in later)  # the shared prefill, counted
