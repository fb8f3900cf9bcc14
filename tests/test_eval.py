"""Evaluation: metrics on hand-computed cases, decoding points, report schema, CLI and the lmms-eval plugin."""

from __future__ import annotations

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
from PIL import Image

from nemo_bard.eval import metrics
from nemo_bard.eval.evaluation import DecodePoint, evaluate, load_samples, parse_points
from nemo_bard.eval.report import markdown_table, write_report

ROW_KEYS = {
    "name", "model", "model_dir", "kind", "block_size", "denoising_steps", "threshold", "remasking_strategy", "n",
    "accuracy", "char_accuracy", "position_accuracy", "tokens_per_forward", "tokens_per_second", "num_forwards",
    "row_forwards", "tokens_per_batch_forward", "response_tokens", "wall_time", "eval_time", "batch_size",
    "max_new_tokens", "device", "dtype",
}


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    from nemo_bard.data.digits import write_digits_dataset

    root = tmp_path_factory.mktemp("eval_digits")
    write_digits_dataset(root, train=0, test=6, seed=0, min_digits=3, max_digits=5)
    return root


# ------------------------------------------------------------------------------------ metrics


def test_exact_match():
    assert metrics.exact_match("40172", " 40172\n") == 1.0
    assert metrics.exact_match("40172", "40173") == 0.0
    assert metrics.exact_match("a  b", "a b") == 1.0  # inner whitespace runs collapse
    assert metrics.exact_match("Cat", "cat") == 0.0  # case counts


def test_confidence_intervals():
    lo, hi = metrics.wilson_interval(50, 100)  # textbook values: 0.5 of 100 -> [0.4038, 0.5962]
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = metrics.wilson_interval(0, 10)  # no successes: [0, 0.2775]
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = metrics.mean_interval([0.0, 1.0, 0.5, 0.5])  # mean 0.5, sd sqrt(1/6), n 4
    assert hi - 0.5 == pytest.approx(1.959964 * (1 / 6) ** 0.5 / 2, rel=1e-6) and lo == pytest.approx(1 - hi)
    agg = metrics.aggregate([{"exact_match": 1.0, "char_accuracy": 1.0, "position_accuracy": 1.0}] * 3
                            + [{"exact_match": 0.0, "char_accuracy": 0.5, "position_accuracy": 0.25}])
    assert agg["accuracy"] == 0.75 and agg["accuracy_ci95"] == metrics.wilson_interval(3, 4)
    assert agg["char_accuracy_ci95"] == metrics.mean_interval([1.0, 1.0, 1.0, 0.5])


def test_char_and_position_accuracy():
    ca, pa = metrics.char_accuracy, metrics.position_accuracy
    assert ca("40173", "40172") == pytest.approx(0.8)  # 1 substitution / 5
    assert ca("4017", "40172") == pytest.approx(0.8)  # 1 deletion / 5
    assert ca("401722", "40172") == pytest.approx(1 - 1 / 6)  # 1 insertion / 6
    assert ca("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert ca("", "") == 1.0 and ca("abc", "") == 0.0 and ca("", "abc") == 0.0
    assert pa("40173", "40172") == pytest.approx(0.8)
    # A missing first digit shifts everything: position accuracy 0, char accuracy 0.8.
    assert pa("0172", "40172") == 0.0 and ca("0172", "40172") == pytest.approx(0.8)
    assert metrics.levenshtein("flaw", "lawn") == 2
    agg = metrics.aggregate([metrics.score("12", "12"), metrics.score("13", "12")])
    means = {k: agg[k] for k in ("accuracy", "char_accuracy", "position_accuracy")}
    assert means == {"accuracy": 0.5, "char_accuracy": 0.75, "position_accuracy": 0.75}
    assert math.isnan(metrics.aggregate([])["accuracy"])


# ------------------------------------------------------------------------------ decode points


def test_parse_points():
    a, b, c = parse_points("4:4:1.0, 16:16:0.9,8:4:1.0:dynamic")
    assert (a.block_size, a.denoising_steps, a.threshold, a.remasking_strategy) == (4, 4, 1.0, "low_confidence_static")
    assert b.remasking_strategy == "low_confidence_dynamic" and b.label == "B16 S16 t0.9"
    assert c.remasking_strategy == "low_confidence_dynamic" and c.label == "B8 S4 t1 dynamic"
    assert parse_points("AR")[0].is_ar and parse_points(None) == []
    assert parse_points([DecodePoint(4, 2, 0.5)]) == [DecodePoint(4, 2, 0.5)]
    # spec: what parse reads, strategy spelled out (the tuned point's record in the demo's report)
    assert (a.spec, b.spec, c.spec, DecodePoint().spec) == ("4:4:1:static", "16:16:0.9:dynamic", "8:4:1:dynamic", "AR")
    assert DecodePoint.parse(b.spec).remasking_strategy == b.remasking_strategy and DecodePoint.parse(c.spec) == c
    for bad in ("4:4", "4:8:1.0", "x:4:1.0", "4:4:1.0:fast"):
        with pytest.raises(ValueError):
            parse_points(bad)


def test_load_samples_references_and_prompts(digits_data):
    samples = load_samples(digits_data / "test", limit=4)  # images resolve against the parent folder
    assert len(samples) == 4
    for s in samples:
        assert s.reference.isdigit() and [m["role"] for m in s.prompt] == ["user"]
        assert s.prompt[0]["content"][0]["image"].size == (32 * len(s.reference), 32)


def _chat(answer_text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "Read it."}, {"role": "assistant", "content": answer_text}],
            **extra}


def test_rows_with_an_empty_reference_are_skipped_and_counted(tmp_path, caplog, capsys):
    """An ``answer`` of "" next to a non-empty assistant turn is never scored against the empty string: the row is
    skipped, counted, and the warning and the CLI's line say so; a dataset of only such rows is one error line."""
    from nemo_bard.eval.__main__ import main

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        _chat("12", answer="12"), _chat("345", answer=""), _chat("6", answer="  "), _chat("78")]) + "\n")
    with caplog.at_level("WARNING"):
        samples = load_samples(data)
    assert [(s.row, s.reference) for s in samples] == [(0, "12"), (3, "78")]
    assert len(samples.skipped_empty) == 2 and samples.skipped_empty[0].endswith("row 1")
    assert "2 rows with an empty reference" in caplog.text and "skipped, not scored" in caplog.text
    only_empty = tmp_path / "empty_refs.jsonl"
    only_empty.write_text(json.dumps(_chat("345", answer="")) + "\n")
    assert main(["--model", str(tmp_path / "unused"), "--data", str(only_empty)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "examples" not in line]
    assert err == [f"error: no rows to evaluate in {only_empty}: 1 row with an empty reference (an 'answer' of \"\" or "
                   f"an assistant turn without text) skipped, not scored (first: {only_empty} row 0)"]


def test_a_truncated_model_is_named_before_loading(tiny_bard_dir, digits_data, tmp_path, capsys):
    import shutil

    from nemo_bard.eval.__main__ import main

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bard_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["--model", str(broken), "--data", str(digits_data / "test"), "--out-dir", str(tmp_path / "r")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: {weights} is damaged: ") and not (tmp_path / "r").exists()


def test_zero_row_dataset_message_is_not_about_training(tmp_path, capsys):
    from datasets import Dataset

    from nemo_bard.eval.__main__ import main

    Dataset.from_dict({"messages": []}).save_to_disk(str(tmp_path / "zero"))
    assert main(["--model", str(tmp_path / "unused"), "--data", str(tmp_path / "zero")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "examples" not in line]
    assert err == [f"error: dataset {tmp_path / 'zero'} has 0 rows; it needs rows with a 'messages' field (the chat "
                   "turns)"]


def test_a_missing_data_path_or_model_directory_is_one_line(tmp_path, capsys, digits_data):
    """Both answered before the evaluation stack loads: the --data path first, then each --model after the rows."""
    from nemo_bard.eval.__main__ import main

    assert main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --data {tmp_path / 'nope'} not found; pass a save_to_disk directory, a .jsonl file or a directory of "
        ".jsonl files")
    assert main(["--model", str(tmp_path / "m"), "--data", str(digits_data / "test"), "--limit", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --model directory {tmp_path / 'm'} not found; pass a model directory (bard_vl or Qwen3-VL)")


# --------------------------------------------------------------------------- evaluate + report


@pytest.fixture(scope="module")
def eval_rows(tiny_ar_dir, tiny_bard_dir, digits_data):
    samples = load_samples(digits_data / "test")
    common = dict(batch_size=4, max_new_tokens=8, progress=False)
    ar = evaluate(tiny_ar_dir, samples, name="ar", **common)
    bard = evaluate(tiny_bard_dir, samples, "4:4:1.0,4:2:0.5", name="bard", **common)
    return ar + bard


def test_evaluate_rows_schema(eval_rows):
    assert [r["name"] for r in eval_rows] == ["ar AR", "bard B4 S4 t1", "bard B4 S2 t0.5"]
    assert all(r["skipped_empty_reference"] == 0 for r in eval_rows)
    assert [r["kind"] for r in eval_rows] == ["ar", "bard", "bard"]
    for r in eval_rows:
        assert ROW_KEYS <= set(r)
        assert r["n"] == 6 and len(r["predictions"]) == 6
        assert 0.0 <= r["accuracy"] <= r["char_accuracy"] + 1e-9 <= 1.0 + 1e-9
        assert r["response_tokens"] > 0 and r["num_forwards"] > 0 and r["wall_time"] > 0
        assert r["tokens_per_second"] > 0
        assert set(r["predictions"][0]) >= {"row", "reference", "prediction", "exact_match", "char_accuracy"}
    ar, static, dynamic = eval_rows
    assert ar["tokens_per_forward"] == 1.0  # AR: one token per forward per sequence
    assert static["tokens_per_forward"] <= 1.0 + 1e-9  # tau 1.0, S = B: one token per forward at most
    assert dynamic["tokens_per_forward"] >= 2.0 - 1e-9  # S = B/2: at least two tokens per forward
    assert static["remasking_strategy"] == "low_confidence_static" and ar["remasking_strategy"] is None


def test_force_ar_on_a_bard_checkpoint_matches_the_source_ar(eval_rows, tiny_bard_dir, digits_data):
    # A freshly converted checkpoint holds the AR weights unchanged: --ar decoding must reproduce the AR row.
    rows = evaluate(tiny_bard_dir, load_samples(digits_data / "test"), "4:4:1.0", name="conv", force_ar=True,
                    batch_size=4, max_new_tokens=8, warmup=False, progress=False)
    assert len(rows) == 1 and rows[0]["kind"] == "ar"  # points are ignored for AR decoding
    assert [p["prediction"] for p in rows[0]["predictions"]] == [p["prediction"] for p in eval_rows[0]["predictions"]]


def test_write_report(eval_rows, tmp_path):
    paths = write_report(eval_rows, tmp_path, title="tiny")
    data = json.loads(paths["json"].read_text())
    assert data["reference"] == "ar AR" and len(data["results"]) == 3
    for r in data["results"]:
        assert ROW_KEYS <= set(r) and "predictions" not in r and "speedup_vs_reference" in r
    assert data["results"][0]["speedup_vs_reference"] == 1.0
    md = paths["markdown"].read_text().splitlines()
    header = [c.strip() for c in md[2].strip("|").split("|")]
    assert header[:3] == ["model", "B", "S"] and "×AR" in header and "tokens/s" in header and "TPF" in header
    assert len(md) == 2 + 2 + 3 and "1.00×" in md[4]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "predictions").glob("*.jsonl"))) == 3
    # Without an AR row there is no relative-speed column.
    assert "×AR" not in markdown_table(eval_rows[1:])
    with pytest.raises(ValueError):
        write_report(eval_rows, tmp_path, reference="missing")


def test_cli(tiny_bard_dir, digits_data, tmp_path, capsys):
    from nemo_bard.eval.__main__ import main

    rc = main(["--model", str(tiny_bard_dir), "--data", str(digits_data / "test"), "--limit", "2",
               "--points", "4:4:0.9", "--max-new-tokens", "4", "--batch-size", "2", "--out-dir", str(tmp_path),
               "--name", "tiny", "--no-warmup", "--no-progress"])
    assert rc == 0
    assert "| tiny | 4 | 4 | 0.90 | dynamic | 2 |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(rows) == 1 and rows[0]["n"] == 2 and rows[0]["threshold"] == 0.9
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.png").is_file()
    assert main(["--model", str(tiny_bard_dir), "--data", str(digits_data / "test"), "--points", "4:9:1"]) == 2


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    """Three colour rows, all videos (2-s mp4 clips), plus a copy whose row 1 clip is corrupt."""
    from nemo_bard.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("eval_videos")
    path = write_synthetic_dataset(root, rows=3, video_every=1, seed=2)
    bad = root / "bad.jsonl"
    bad.write_text(path.read_text().replace("videos/00001.mp4", "videos/broken.mp4"))
    (root / "videos" / "broken.mp4").write_bytes(b"\x00" * 64)
    return path


def test_cli_on_video_rows(tiny_bard_dir, video_data, tmp_path, capsys):
    from nemo_bard.eval.__main__ import main

    samples = load_samples(video_data)
    assert [s.prompt[0]["content"][0]["type"] for s in samples] == ["video"] * 3
    rc = main(["--model", str(tiny_bard_dir), "--data", str(video_data), "--points", "4:4:1.0",
               "--max-new-tokens", "4", "--batch-size", "2", "--video-max-frames", "2", "--out-dir", str(tmp_path),
               "--no-warmup", "--no-progress"])
    assert rc == 0 and json.loads((tmp_path / "results.json").read_text())["results"][0]["n"] == 3
    capsys.readouterr()
    assert main(["--model", str(tiny_bard_dir), "--data", str(video_data.parent / "bad.jsonl"), "--points",
                 "4:4:1.0", "--max-new-tokens", "4", "--out-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "bad.jsonl row 1: cannot open video" in err[-1] and "broken.mp4" in err[-1]


# ------------------------------------------------------------------------------ lmms-eval plugin


def _requests(n, gen_kwargs):
    from PIL import Image

    def doc_to_visual(doc):
        return [Image.open(doc["path"]).convert("RGB")]

    return [SimpleNamespace(args=("<image>Read the digits.", dict(gen_kwargs[i % len(gen_kwargs)]), doc_to_visual,
                                  i, "digits", "test")) for i in range(n)]


def test_lmms_core_generate_until(tiny_bard_dir, digits_data):
    from nemo_bard.eval.lmms.core import BardLmmsModel

    with pytest.raises(TypeError):
        BardLmmsModel(str(tiny_bard_dir), block_sise=4)  # typo'd model arg
    model = BardLmmsModel(str(tiny_bard_dir), block_size=4, confidence_threshold=0.9, batch_size=2)
    assert model.point.remasking_strategy == "low_confidence_dynamic" and model.point.block_size == 4
    docs = [{"path": str(p)} for p in sorted((digits_data / "images").glob("test_*.png"))[:3]]
    model.task_dict = {"digits": {"test": docs}}
    reqs = _requests(3, [{"max_new_tokens": 4, "until": ["\n\n"]}, {"max_new_tokens": 8, "temperature": 0}])
    out = model.generate_until(reqs)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert model.stats["requests"] == 3 and model.stats["response_tokens"] > 0
    # Same request alone gives the same (greedy) answer: results come back in request order.
    assert model.generate_until(reqs[1:2]) == [out[1]]
    assert model._settings({"until": ["\n\n", "</s>"], "max_new_tokens": 5})["until"] == ["</s>"]


def test_lmms_core_video_visuals(tiny_bard_dir, coded_clip, digits_data):
    from nemo_bard.eval.lmms.core import BardLmmsModel

    model = BardLmmsModel(str(tiny_bard_dir), block_size=4, video_max_frames=2)
    image = sorted((digits_data / "images").glob("test_*.png"))[0]
    msgs = model.build_messages("<image>Describe.", [str(coded_clip), str(image)])
    assert [it["type"] for it in msgs[0]["content"]] == ["video", "image", "text"]
    model.task_dict = {"clips": {"test": [{"clip": str(coded_clip)}]}}
    req = SimpleNamespace(args=("What happens?", {"max_new_tokens": 4}, lambda doc: [doc["clip"]], 0, "clips", "test"))
    assert len(model.generate_until([req])) == 1 and model.stats["requests"] == 1


def test_lmms_task_writer_with_videos(video_data, tmp_path):

    from nemo_bard.eval.lmms.task import write_task

    write_task(video_data, tmp_path, name="clips", limit=2)
    docs = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    assert [d["videos"] for d in docs] == [[str((video_data.parent / f"videos/{i:05d}.mp4").resolve())] for i in (0, 1)]
    assert docs[0]["images"] == [] and docs[0]["question"] == "What colour is the moving square?"
    spec = importlib.util.spec_from_file_location("clips_utils", tmp_path / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.doc_to_visual(docs[0]) == docs[0]["videos"]


def test_lmms_task_writer(digits_data, tmp_path):
    from nemo_bard.eval.lmms.task import write_task

    yaml = write_task(digits_data / "test", tmp_path, name="digits_ocr", limit=3)
    text = yaml.read_text()
    assert "task: \"digits_ocr\"" in text and "dataset_path: json" in text and "exact_match" in text
    docs = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    assert len(docs) == 3 and docs[0]["question"] == "Read the digits." and docs[0]["answer"].isdigit()
    assert all((tmp_path / "images").joinpath(p.split("/")[-1]).is_file() for d in docs for p in d["images"])
    spec = importlib.util.spec_from_file_location("digits_utils", tmp_path / "utils.py")  # lmms-eval's !function
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.doc_to_text(docs[0], {"pre_prompt": "Q: "}) == "Q: Read the digits."
    assert utils.doc_to_visual(docs[0])[0].size == Image.open(docs[0]["images"][0]).size
    ref = docs[0]["answer"]
    assert utils.process_results(docs[0], [ref[:-1] + "x"]) == {"exact_match": 0.0,
                                                                 "char_accuracy": 1 - 1 / len(ref)}


def test_lmms_harness_registration():
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra")
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from nemo_bard.eval.lmms import CLASS_PATH, lmms_eval_manifest

    registry = ModelRegistryV2()
    registry.register_manifest(lmms_eval_manifest())
    resolved = registry.resolve("nemo_bard")
    assert resolved.class_path == CLASS_PATH and resolved.model_type == "simple"
    cls = registry.get_model_class("nemo_bard")  # imports and validates (subclass of lmms, is_simple)
    assert issubclass(cls, lmms) and registry.resolve("bard_vl").model_id == "nemo_bard"


def test_the_package_names_are_the_functions_whatever_was_imported_first():
    """``nemo_bard.eval`` loads its names on first access; no submodule shadows one of them (a module named like
    its function would replace the function on the package once imported)."""
    import nemo_bard.eval.evaluation  # noqa: F401
    import nemo_bard.eval.samples  # noqa: F401
    import nemo_bard.eval.tune  # noqa: F401
    from nemo_bard.eval import TuneResult, evaluate, load_samples, write_report

    assert [f.__module__ for f in (evaluate, load_samples, TuneResult, write_report)] == [
        "nemo_bard.eval.evaluation", "nemo_bard.eval.samples", "nemo_bard.eval.tune", "nemo_bard.eval.report"]
