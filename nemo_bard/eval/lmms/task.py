"""Write an offline lmms-eval task for a nemo-bard chat dataset (e.g. the digits test split).

    python -m nemo_bard.eval.lmms.task --data OUT/test --root-dir OUT --out TASK_DIR [--name digits_ocr] [--limit N]
    lmms-eval --model nemo_bard --model_args pretrained=DIR --tasks digits_ocr --include_path TASK_DIR

The task reads ``TASK_DIR/docs.jsonl`` (one doc per row: absolute image and video paths, the prompt
text, the reference answer) through the ``json`` dataset builder, so nothing is downloaded, and scores
``exact_match`` and ``char_accuracy`` exactly as :mod:`nemo_bard.eval.metrics` does, so its numbers
can be compared with ``python -m nemo_bard.eval`` on the same rows.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

from nemo_bard.data.media import VIDEO_SUFFIXES, VideoSource, load_image
from nemo_bard.eval.evaluation import load_samples

# the task's ``utils.py``: lmms-eval resolves ``!function utils.<name>`` next to the YAML
_UTILS = ('"""Doc hooks of a nemo-bard chat task (see nemo_bard.eval.lmms.task_utils)."""\n\n'
          "from nemo_bard.eval.lmms.task_utils import doc_to_target, doc_to_text, doc_to_visual, process_results  "
          "# noqa: F401\n")

_YAML = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
task: "{name}"
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: char_accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""


def write_task(
    data: str | Path,
    out_dir: str | Path,
    root_dir: str | Path | None = None,
    name: str = "nemo_bard_chat",
    limit: int | None = None,
    max_new_tokens: int = 64,
) -> Path:
    """Write ``{name}.yaml``, ``utils.py`` and ``docs.jsonl`` to ``out_dir``; returns the YAML path.

    Images of each prompt are re-saved under ``out_dir/images``; video files are referenced by absolute
    path (video bytes and frame lists are written under ``out_dir/videos``); the question is the
    prompt's text (user turns joined by newlines); the answer is the reference of
    :func:`nemo_bard.eval.evaluation.load_samples`.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    samples = load_samples(data, root_dir, limit)
    docs = out / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for k, s in enumerate(samples):
            texts, images, videos = [], [], []
            for m in s.prompt:
                content = m.get("content")
                if isinstance(content, str):
                    texts.append(content)
                    continue
                for it in content or []:
                    if it.get("type") == "image":
                        path = out / "images" / f"{k:05d}_{len(images)}.png"
                        it["image"].save(path)  # media are loaded as PIL images; re-save for the task
                        images.append(str(path))
                    elif it.get("type") == "video":
                        videos.append(_video_path(it["video"], out / "videos" / f"{k:05d}_{len(videos)}"))
                    elif it.get("type") == "text":
                        texts.append(it.get("text", ""))
            f.write(json.dumps({"id": k, "row": s.row, "images": images, "videos": videos,
                                "question": "\n".join(texts), "answer": s.reference}) + "\n")
    (out / "utils.py").write_text(_UTILS)
    yaml = out / f"{name}.yaml"
    yaml.write_text(_YAML.format(docs=json.dumps(os.fspath(docs)), name=name, max_new_tokens=max_new_tokens))
    return yaml


def _video_path(src: VideoSource, stem: Path) -> str:
    """An absolute path lmms-eval can hand back: the video file or frame directory, else a written copy."""
    if src.path is not None:
        return str(src.path.resolve())
    stem.parent.mkdir(exist_ok=True)
    if src.data is not None:  # encoded bytes: a file named after its container format
        # optional dependency (the [video] extra)
        import av

        with av.open(io.BytesIO(src.data)) as container:
            exts = container.format.extensions
        path = stem.with_suffix(next((s for s in VIDEO_SUFFIXES if s[1:] in exts), ".mp4"))
        path.write_bytes(src.data)
        return str(path)
    stem.mkdir(exist_ok=True)  # a list of frames: a frame directory
    for i, frame in enumerate(src.frames):
        load_image(frame).save(stem / f"{i:05d}.png")
    return str(stem)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.eval.lmms.task", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--root-dir", default=None)
    ap.add_argument("--out", required=True, help="task directory (pass it to lmms-eval --include_path)")
    ap.add_argument("--name", default="nemo_bard_chat")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    yaml = write_task(args.data, args.out, args.root_dir, args.name, args.limit, args.max_new_tokens)
    print(f"wrote {yaml}; run: lmms-eval --model nemo_bard --model_args pretrained=DIR --tasks {args.name} "
          f"--include_path {yaml.parent}")


if __name__ == "__main__":
    main()
