"""bench.decode's bookkeeping without a model: median of interleaved runs, a failing engine as a row."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from nemo_bard.bench.decode import _median_runs, _row, markdown


def _out(wall: float, tokens: list[int]) -> SimpleNamespace:
    return SimpleNamespace(response_tokens=4, num_forwards=2, decode_forwards=2, tokens_per_forward=2.0,
                           tokens_per_batch_forward=2.0, wall_time=wall, prefill_time=0.1, decode_time=wall - 0.1,
                           ms_per_forward=1000 * (wall - 0.1) / 2, tokens_per_second=4 / wall,
                           sequences=torch.tensor([tokens]))


def test_median_runs_and_a_failing_engine_is_a_row_not_a_crash():
    walls = iter([9.0, 0.5, 0.3, 0.4])  # warm-up, then three timed runs

    def broken():
        raise RuntimeError("CUDA graph capture failed\ndetails on the next line")

    best = _median_runs({"static": lambda: _out(next(walls), [1, 2, 3, 4]), "compiled": broken}, repeats=3)
    assert best["static"].wall_time == 0.4  # the median of 0.5, 0.3, 0.4; the warm-up is not timed
    assert best["compiled"] == "RuntimeError: CUDA graph capture failed"
    ref = _out(1.0, [1, 2, 3, 4])
    rows = [_row("bard", "static", 1, best["static"], ref, point="B4 S2 t0.9"),
            _row("bard", "compiled", 1, best["compiled"], ref, point="B4 S2 t0.9"),
            _row("bard", "eager", 1, _out(1.0, [1, 2, 3, 5]), ref, point="B4 S2 t0.9")]
    assert rows[0]["tokens_match_eager"] and not rows[2]["tokens_match_eager"]
    assert rows[0]["decode_tokens_per_second"] == round(4 / 0.3, 2) and rows[1] == {
        "model": "bard", "engine": "compiled", "batch_size": 1, "point": "B4 S2 t0.9",
        "error": "RuntimeError: CUDA graph capture failed"}
    for r in rows:
        r.setdefault("x_ar", 1.0)
    table = markdown({"results": rows}).splitlines()
    failed = "| 1 | bard | compiled | B4 S2 t0.9 | failed: RuntimeError: CUDA graph capture failed | | | | | | | |"
    assert table[3] == failed
    assert table[2] == "| 1 | bard | static | B4 S2 t0.9 | 2.00 | 150.00 | 100.0 | 10.0 | 13.3 | 1.00 | – | yes |"
    assert table[2].endswith("| yes |") and table[4].endswith("| NO |")


def test_answer_agreement_counts_tokens_up_to_the_longer_answer():
    """bench.agreement: positions past both answers are not counted; an answer that stops earlier disagrees on
    the other's remaining tokens (hand-computed)."""
    from nemo_bard.bench.agreement import answer_agreement

    pad = 0
    a = torch.tensor([[5, 6, 7, 2], [5, 6, 2, pad], [8, 2, pad, pad]])
    b = torch.tensor([[5, 6, 7, 2, pad], [5, 9, 2, pad, pad], [8, 8, 8, 2, pad]])
    same, agree = answer_agreement(a, torch.tensor([4, 3, 2]), b, torch.tensor([4, 3, 4]))
    # row 0: 4/4 equal; row 1: 2/3 (position 1 differs); row 2: 1/4 (eos vs 8, then pad vs 8, pad vs 2)
    assert same == 1 and agree == (4 + 2 + 1) / (4 + 3 + 4)


def test_agreement_bad_data_is_one_line(tiny_bard_dir, tmp_path, capsys):
    """bench.agreement --data: a missing path and a malformed JSONL row each give one line (naming the file and row)
    and exit code 2, before any model is loaded."""
    from nemo_bard.bench.agreement import main

    assert main(["--model", str(tiny_bard_dir), "--data", str(tmp_path / "missing")]) == 2
    assert f"--data {tmp_path / 'missing'}: no such file or directory" in capsys.readouterr().err
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    assert main(["--model", str(tiny_bard_dir), "--data", str(bad)]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if "nemo_bard.bench.agreement" in line]
    assert len(ours) == 1 and "rows.jsonl:2: invalid JSON" in ours[0] and "Traceback" not in ours[0]
