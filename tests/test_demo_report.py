"""The demo report's paired comparisons (hand-computed) and its claim rows."""

from __future__ import annotations

import math

import pytest

from nemo_bard.demo import (
    CONTROL_NAME,
    SWD_NAME,
    TUNED_NAME,
    comparisons,
    comparisons_markdown,
    paired_difference,
)


def _preds(correct: list[int], rows: list[int] | None = None) -> list[dict]:
    return [{"row": r, "exact_match": float(c)} for r, c in zip(rows or range(len(correct)), correct)]


def test_paired_difference_by_hand():
    a = _preds([1, 1, 1, 0, 1])
    b = _preds([1, 0, 0, 0, 1])
    d = paired_difference(a, b)  # differences 0, 1, 1, 0, 0: mean 0.4, sample sd sqrt(0.3)
    half = 1.959963984540054 * math.sqrt(0.3) / math.sqrt(5)
    assert d["diff"] == pytest.approx(0.4) and d["n"] == 5
    assert d["ci95"] == pytest.approx([0.4 - half, 0.4 + half])
    assert (d["a_only"], d["b_only"]) == (2, 0)
    # pairs by row id, not by list order
    shuffled = paired_difference(_preds([0, 1, 1, 1, 1], [3, 0, 1, 2, 4]), b)
    assert shuffled["diff"] == pytest.approx(0.4) and shuffled["b_only"] == 0
    with pytest.raises(ValueError, match="same rows"):
        paired_difference(a, _preds([1, 0, 0], [0, 1, 7]))


def test_comparisons_name_the_claims():
    def row(model: str, t: float | None, correct: list[int]) -> dict:
        return {"model": model, "threshold": t, "kind": "ar" if t is None else "bard",
                "name": f"{model} {t}", "predictions": _preds(correct)}

    rows = [row("AR (NeMo SFT)", None, [1, 1, 1, 0])]
    for t in (1.0, 0.9):
        rows += [row("PBM stage B4", t, [1, 1, 1, 1]), row("PBM stage B8", t, [1, 1, 0, 1]),
                 row("PBM stage B16", t, [1, 0, 0, 0]), row(SWD_NAME, t, [1, 1, 0, 0]),
                 row(CONTROL_NAME, t, [1, 0, 0, 1])]
    comps = {c["comparison"]: c for c in comparisons(rows, 0.9)}
    assert comps["PBM B16 - PBM B4, τ 1 (large blocks lose?)"]["diff"] == pytest.approx(-0.75)
    assert comps["SWD B16 - PBM B16, τ 0.9 (SWD recovers?)"]["diff"] == pytest.approx(0.25)
    sc = comps["SWD B16 - Control B16, τ 1 (distillation itself)"]
    assert sc["diff"] == pytest.approx(0.0) and (sc["a_only"], sc["b_only"]) == (1, 1)
    assert comps["PBM B4 - AR, τ 1 (conversion cost)"]["diff"] == pytest.approx(0.25)
    assert len(comps) == 12
    table = comparisons_markdown(list(comps.values()))
    assert "| PBM B16 - PBM B4, τ 1 (large blocks lose?) | -75.0 |" in table and table.count("\n") == 14
    # the SWD student at the point tuned on dev (here τ 0.7), against AR on the same rows
    tuned = {c["comparison"]: c for c in comparisons([*rows, row(TUNED_NAME, 0.7, [1, 1, 1, 1])], 0.9)}
    assert len(tuned) == 13 and tuned["SWD B16 at its tuned point - AR"]["diff"] == pytest.approx(0.25)


def test_the_demo_finds_its_configs_inside_the_package():
    """The configs are package data (``conf/`` in a clone links to ``nemo_bard/conf``), so the demo runs from a
    non-editable install too; setup.py's ``package_data`` globs cover every config file."""
    import ast
    from pathlib import Path, PurePosixPath

    import nemo_bard
    from nemo_bard import demo

    package = Path(nemo_bard.__file__).resolve().parent
    assert demo.CONF == package / "conf" and (demo.CONF / "bard_demo.yaml").is_file()
    setup = (package.parent / "setup.py").read_text()
    globs = next(ast.literal_eval(kw.value)["nemo_bard"] for node in ast.walk(ast.parse(setup))
                 if isinstance(node, ast.Call) for kw in node.keywords if kw.arg == "package_data")
    files = [str(p.relative_to(package)) for p in (package / "conf").rglob("*") if p.is_file()]
    assert files and [f for f in files if not any(PurePosixPath(f).match(g) for g in globs)] == []


def test_eval_only_writes_the_dev_split_an_older_demo_directory_lacks(tmp_path):
    """A demo directory made before the dev split existed gets one with its own digits settings; its test rows
    and images stay byte for byte, and no dev row is a test row."""
    import json

    from datasets import load_from_disk

    from nemo_bard.data.digits import write_digits_dataset
    from nemo_bard.demo import ensure_dev_split

    digits = tmp_path / "digits"
    write_digits_dataset(digits, train=0, test=12, seed=3, min_digits=2, max_digits=3, task="odd_count")
    before = {p.name: p.read_bytes() for p in sorted((digits / "images").iterdir())}
    config = (digits / "digits_config.json").read_text()
    dev = ensure_dev_split(tmp_path, 5)
    assert dev == digits / "dev" and ensure_dev_split(tmp_path, 99) == dev  # written once
    rows, test = load_from_disk(str(dev)), load_from_disk(str(digits / "test"))
    assert len(rows) == 5 and set(rows["task"]) == {"odd_count"}
    assert not {tuple(r) for r in rows["scan_ids"]} & {tuple(r) for r in test["scan_ids"]}
    after = {p.name: p.read_bytes() for p in sorted((digits / "images").iterdir())}
    assert {k: v for k, v in after.items() if k.startswith("test_")} == before
    assert sorted(k for k in after if k.startswith("dev_")) == [f"dev_{i:05d}.png" for i in range(5)]
    assert (digits / "digits_config.json").read_text() == config and json.loads(config)["test"] == 12
    assert not (tmp_path / "digits_dev.tmp").exists()


@pytest.mark.parametrize("argv, message", [
    (["--tune-tolerance", "-1"], "--tune-tolerance must be a number of exact-match points >= 0, got -1.0"),
    (["--tune-tolerance", "nan"], "--tune-tolerance must be a number of exact-match points >= 0, got nan"),
    (["--dev-rows", "0"], "--dev-rows must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--layers", "0"], "--layers must be at least 1, got 0"),
])
def test_bad_tuning_flags_are_one_line_before_anything_runs(argv, message, tmp_path, capsys):
    from nemo_bard.demo import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "demo")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("env, expected", [(None, 1), ("3", 3), ("0", 1), ("4,2", 1)])
def test_default_threads_follow_omp_num_threads_else_one(env, expected, monkeypatch):
    from nemo_bard.demo import default_threads

    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    assert default_threads() == expected


def test_each_stage_process_gets_the_demos_thread_count(tmp_path, monkeypatch):
    """The trained models depend on the torch thread count, so a stage runs with the demo's, not the caller's."""
    import sys

    from nemo_bard.demo import _run

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    probe = [sys.executable, "-c", "import os; print('threads', os.environ['OMP_NUM_THREADS'])"]
    _run(probe, tmp_path / "three.log", "probe", 1, threads=3)
    _run(probe, tmp_path / "inherited.log", "probe", 1)
    assert (tmp_path / "three.log").read_text().split() == ["threads", "3"]
    assert (tmp_path / "inherited.log").read_text().split() == ["threads", "7"]
