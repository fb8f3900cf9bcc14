"""Write evaluation rows (from :func:`nemo_bard.eval.evaluation`) as JSON, a markdown table and a plot.

``write_report(rows, out_dir)`` writes

* ``results.json``: ``{"reference": <AR row name or null>, "results": [row, ...]}`` (rows without
  their per-sample predictions);
* ``results.md``: one table row per setting, with "×AR" columns (tokens/s, and decode tokens/s after the
  prompt prefill, relative to the fastest AR row) when an AR row is present;
* ``results.png``: exact match and char accuracy against tokens/s, one point per setting, AR rows
  drawn as red stars;
* ``predictions/<setting>.jsonl``: per-sample references, predictions and scores.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

TABLE_COLUMNS = ("model", "B", "S", "τ", "strategy", "n", "exact match", "char acc", "TPF", "tokens/s",
                 "×AR", "decode tokens/s", "decode ×AR", "forwards", "wall s")


def reference_row(rows: list[dict], reference: str | None = None, key: str = "tokens_per_second") -> dict | None:
    """The row named ``reference``, else the AR row with the highest ``key``, else None."""
    if reference is not None:
        for r in rows:
            if r["name"] == reference:
                return r
        raise ValueError(f"reference {reference!r} is not one of the rows {[r['name'] for r in rows]}")
    ar = [r for r in rows if r.get("kind") == "ar" and r.get(key) is not None and not math.isnan(r[key])]
    return max(ar, key=lambda r: r[key], default=None)


def _with_ci(row: dict, key: str) -> str:
    """``0.645 [0.576, 0.708]``: a metric and its 95 % interval (when the row has one)."""
    ci = row.get(f"{key}_ci95")
    if ci is None or any(v is None or math.isnan(v) for v in ci):
        return _fmt(row[key])
    return f"{_fmt(row[key])} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def relative_speed(row: dict, ref: dict | None, key: str = "tokens_per_second") -> float | None:
    """``row[key]`` (tokens/s by default) divided by the reference's (None without usable values)."""
    if ref is None or not ref.get(key) or math.isnan(ref[key]) or row.get(key) is None:
        return None
    return row[key] / ref[key]


def markdown_table(rows: list[dict], reference: str | None = None) -> str:
    """Markdown table of the rows (accuracies with their 95 % intervals); "×AR" columns only with an AR row."""
    ref = reference_row(rows, reference)
    dref = reference_row(rows, reference, "decode_tokens_per_second")
    cols = [c for c in TABLE_COLUMNS if (c != "×AR" or ref is not None) and (c != "decode ×AR" or dref is not None)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in ("model", "strategy") else "---:"
                                                            for c in cols) + "|"]
    for r in rows:
        rel = relative_speed(r, ref)
        drel = relative_speed(r, dref, "decode_tokens_per_second")
        strategy = (r.get("remasking_strategy") or "ar").removeprefix("low_confidence_")
        cells = {
            "model": r.get("model") or r["name"], "B": _fmt(r.get("block_size")), "S": _fmt(r.get("denoising_steps")),
            "τ": _fmt(r.get("threshold"), 2) if r.get("threshold") is not None else "–", "strategy": strategy,
            "n": _fmt(r["n"]), "exact match": _with_ci(r, "accuracy"), "char acc": _with_ci(r, "char_accuracy"),
            "TPF": _fmt(r["tokens_per_forward"], 2), "tokens/s": _fmt(r["tokens_per_second"], 1),
            "×AR": "–" if rel is None else f"{rel:.2f}×", "forwards": _fmt(r["num_forwards"]),
            "decode tokens/s": _fmt(r.get("decode_tokens_per_second"), 1),
            "decode ×AR": "–" if drel is None else f"{drel:.2f}×",
            "wall s": _fmt(r["wall_time"], 2),
        }
        lines.append("| " + " | ".join(cells[c] for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Accuracy (exact, char) vs tokens/s, one point per row, labelled with its block size and threshold;
    block-diffusion rows coloured by model, AR rows as red stars; the y axis is zoomed on the data. Uses the
    Agg canvas directly (no display, no global backend switch)."""
    # optional dependency (the [demo] extra); ~1.1 s to import
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    palette = ["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:cyan", "tab:olive", "tab:gray"]
    models = list(dict.fromkeys(r["model"] for r in rows if r.get("kind") != "ar"))
    colour = {m: palette[i % len(palette)] for i, m in enumerate(models)}
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ("accuracy", "char_accuracy"), ("exact match", "char accuracy")):
        for r in rows:
            x, y = r["tokens_per_second"], r[key]
            if r.get("kind") == "ar":
                ax.scatter([x], [y], marker="*", s=220, color="tab:red", edgecolor="black", zorder=3)
                continue
            ax.scatter([x], [y], marker="o", s=60, color=colour[r["model"]], edgecolor="black", zorder=2)
            tau = r.get("threshold")
            text = f"B{r['block_size']} τ{tau:g}" if tau is not None else r["name"]
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ys = [r[key] for r in rows]
        pad = max(0.02, 0.15 * (max(ys) - min(ys)))  # zoom on the data: differences of a point are visible
        ax.set_ylim(max(0.0, min(ys) - pad), min(1.0, max(ys) + pad))
        ax.set_xlabel("tokens / s")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = [
        axes[0].scatter([], [], marker="o", s=60, color=colour[m], edgecolor="black", label=m)
        for m in models
    ]
    if any(r.get("kind") == "ar" for r in rows):
        handles.append(axes[0].scatter([], [], marker="*", s=220, color="tab:red", edgecolor="black", label="AR"))
    axes[0].legend(handles=handles, loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None so results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "row"


def write_report(
    rows: list[dict],
    out_dir: str | Path,
    reference: str | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Write results.json, results.md, results.png and predictions/*.jsonl; returns their paths.

    ``reference`` names the row "×AR" divides by (default: the fastest AR row, if any).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = reference_row(rows, reference)
    dref = reference_row(rows, reference, "decode_tokens_per_second")
    clean = []
    pred_dir = out / "predictions"
    for r in rows:
        row = {k: v for k, v in r.items() if k != "predictions"}
        row["speedup_vs_reference"] = relative_speed(r, ref)
        row["decode_speedup_vs_reference"] = relative_speed(r, dref, "decode_tokens_per_second")
        clean.append(row)
        if r.get("predictions") is not None:
            pred_dir.mkdir(exist_ok=True)
            with open(pred_dir / f"{_slug(r['name'])}.jsonl", "w", encoding="utf-8") as f:
                for p in r["predictions"]:
                    f.write(json.dumps(_json_safe(p)) + "\n")
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    summary = {"reference": ref["name"] if ref else None, "results": clean}
    paths["json"].write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    header = f"# {title}\n\n" if title else ""
    paths["markdown"].write_text(header + markdown_table(rows, ref["name"] if ref else None))
    plot(rows, paths["plot"], title)
    return paths
