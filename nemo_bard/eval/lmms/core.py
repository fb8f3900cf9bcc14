"""Harness-independent core of the lmms-eval model ``nemo_bard`` (no lmms-eval import here).

:class:`BardLmmsModel` implements lmms-eval's simple-model protocol: ``generate_until(requests)``
where each request's ``args`` is ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` and
``self.task_dict[task][split][doc_id]`` is the document ``doc_to_visual`` turns into images
(PIL images or image paths) or video paths (files or frame directories). The harness class in
:mod:`nemo_bard.eval.lmms.models.nemo_bard` only adds lmms-eval's base class.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from nemo_bard.data.media import VideoSampling, is_video_path, load_image
from nemo_bard.eval.evaluation import build_inputs, generate_batch, load_model
from nemo_bard.generation.defaults import read_decoding_defaults
from nemo_bard.generation.points import STRATEGY_ALIASES, DecodePoint

logger = logging.getLogger(__name__)

_HARNESS_ARGS = ("max_batch_size",)  # passed by lmms-eval's evaluator, not used here


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


class BardLmmsModel:
    """A ``bard_vl`` (or AR Qwen3-VL) checkpoint behind lmms-eval's ``generate_until`` protocol.

    Model args (``--model_args k=v,...``):
        pretrained: checkpoint directory (a released ``Bard-VL-*`` or a converted/trained one).
        block_size: B (default: the checkpoint's ``block_size``).
        denoising_steps, confidence_threshold, remasking_strategy: S, tau and ``static``/``dynamic`` (or the full
            names). Each defaults to the checkpoint directory's stored point (``generation_config.json``, written
            by ``python -m nemo_bard.eval --tune``), else S = B, tau 1.0 (one token per forward, the accuracy
            setting); an unset strategy is static for tau >= 1.0 and dynamic below.
        max_new_tokens: response budget; overrides the task's ``max_new_tokens`` when given.
        batch_size: prompts per generation call (default 1).
        device, dtype: default cuda (``cuda:$LOCAL_RANK``) when available else cpu; bf16 on CUDA, fp32 on CPU.
        system_prompt: optional system turn.
        ar: decode with the AR baseline (causal Qwen3-VL); automatic for ``qwen3_vl`` checkpoints.
        engine: decoding engine, ``static`` (default), ``compiled`` or ``eager`` (transformers' own layers).
        video_fps, video_max_frames: video frame sampling (default: the processor's); video files need
            PyAV (``pip install 'nemo-bard[video]'``).

    Task generation kwargs used: ``max_new_tokens``, ``temperature`` (> 0 samples, block diffusion
    only), ``top_p``, ``top_k``, ``until`` (strings the answer is cut at; ``"\\n\\n"`` is ignored, as in
    lmms-eval's Qwen3-VL model, because chat models separate paragraphs with it).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        block_size: int | None = None,
        denoising_steps: int | None = None,
        confidence_threshold: float | None = None,
        remasking_strategy: str | None = None,
        max_new_tokens: int | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        system_prompt: str | None = None,
        ar: bool | str = False,
        seed: int | None = None,
        engine: str = "static",
        video_fps: float | None = None,
        video_max_frames: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()  # lmms.__init__ in the harness class (sets rank, cache hook, task_dict)
        unknown = sorted(set(kwargs) - set(_HARNESS_ARGS))
        if unknown:
            raise TypeError(f"nemo_bard: unknown model_args {unknown}")
        if remasking_strategy is not None and remasking_strategy not in STRATEGY_ALIASES:
            raise ValueError(f"nemo_bard: remasking_strategy must be one of {sorted(STRATEGY_ALIASES)}")
        self._rank = int(os.environ.get("RANK") or getattr(self, "_rank", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE") or getattr(self, "_world_size", 1))
        if not hasattr(self, "task_dict"):
            self.task_dict: dict = {}
        if device is None or device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.loaded = load_model(pretrained, force_ar=_as_bool(ar), device=device, dtype=dtype, engine=engine)
        self._device = torch.device(device)
        if self.loaded.kind == "bard":
            bs = int(block_size or self.loaded.model.config.block_size)
            steps, strategy, tau = read_decoding_defaults(pretrained).resolve(
                bs, None if denoising_steps is None else int(denoising_steps), remasking_strategy,
                None if confidence_threshold is None else float(confidence_threshold), fallback_threshold=1.0)
            self.point = DecodePoint(bs, steps, tau, strategy.removeprefix("low_confidence_"))
        else:
            if block_size is not None or denoising_steps is not None:
                logger.warning("nemo_bard: %s is decoded autoregressively; block/step settings are ignored", pretrained)
            self.point = DecodePoint()
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens is not None else None
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.system_prompt = system_prompt
        self.seed = seed
        self.video_sampling = VideoSampling.from_processor(
            getattr(self.loaded.processor, "video_processor", None),
            fps=None if video_fps is None else float(video_fps),
            max_frames=None if video_max_frames is None else int(video_max_frames),
        )
        self.stats = {"requests": 0, "response_tokens": 0, "num_forwards": 0, "row_forwards": 0, "wall_time": 0.0}
        logger.info("nemo_bard: %s (%s) decoding %s", pretrained, self.loaded.kind, self.point.label)

    # ------------------------------------------------------------------ properties lmms-eval reads
    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def processor(self):
        return self.loaded.processor

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ------------------------------------------------------------------------------ protocol
    def loglikelihood(self, requests: Sequence[Any]) -> list:
        raise NotImplementedError("nemo_bard: loglikelihood is not defined for block-diffusion decoding; "
                                  "use generate_until tasks")

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list:
        raise NotImplementedError("nemo_bard: multi-round generation is not implemented")

    def build_messages(self, context: str, visuals: Any) -> list[dict]:
        """One chat prompt: optional system turn, then the visuals followed by the context text.

        A visual is a video when it is a path with a video suffix or a directory (of frames), else an image
        (PIL image, path or ``{"bytes": ...}``).
        """
        items: list[dict] = []
        for v in visuals if isinstance(visuals, (list, tuple)) else ([visuals] if visuals is not None else []):
            if is_video_path(v):
                items.append({"type": "video", "video": v})
            elif v is not None:
                items.append({"type": "image", "image": load_image(v)})
        text = context.replace("<image>", "").strip() if isinstance(context, str) else str(context)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": items + [{"type": "text", "text": text}]})
        return messages

    def _settings(self, gen_kwargs: dict) -> dict:
        gk = dict(gen_kwargs or {})
        until = gk.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gk.get("temperature") or 0.0)
        return {
            "max_new_tokens": self.max_new_tokens or int(gk.get("max_new_tokens") or 128),
            "temperature": temperature,
            "top_p": gk.get("top_p") if temperature > 0 else None,
            "top_k": gk.get("top_k") if temperature > 0 else None,
            "until": [u for u in until if u and u != "\n\n"],
        }

    def _generate(self, prompts: list[list[dict]], settings: dict):
        inputs = build_inputs(self.processor, prompts, self.video_sampling)
        sampling = {}
        if settings["temperature"] > 0:
            if self.point.is_ar:
                logger.warning("nemo_bard: the AR baseline decodes greedily; temperature is ignored")
            else:
                sampling = {"temperature": settings["temperature"], "top_p": settings["top_p"],
                            "top_k": settings["top_k"], "seed": self.seed}
        return generate_batch(self.loaded, inputs, self.point, settings["max_new_tokens"], **sampling)

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answers for ``requests`` (same order); batches requests with equal generation settings."""
        args = [r.args for r in requests]
        results: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(args):
            key = json.dumps(self._settings(a[1]), sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        pbar = tqdm(total=len(args), desc="nemo_bard", disable=self.rank != 0)
        for key, idxs in groups.items():
            settings = json.loads(key)
            idxs.sort(key=lambda i: -len(str(args[i][0])))  # similar lengths together: less padding
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start:start + self.batch_size]
                prompts = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = args[i][:6]
                    visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
                    prompts.append(self.build_messages(context, visuals))
                out = self._generate(prompts, settings)
                texts = self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
                self._record(out, len(chunk))
                for i, text in zip(chunk, texts):
                    for stop in settings["until"]:
                        text = text.split(stop)[0]
                    results[i] = text.strip()
                    hook = getattr(self, "cache_hook", None)
                    if hook is not None:
                        hook.add_partial("generate_until", (args[i][0], args[i][1]), results[i])
                pbar.update(len(chunk))
        pbar.close()
        s = self.stats
        logger.info("nemo_bard: %d requests, %d tokens, TPF %.2f, %.1f tokens/s", s["requests"], s["response_tokens"],
                    s["response_tokens"] / max(s["row_forwards"], 1),
                    s["response_tokens"] / s["wall_time"] if s["wall_time"] > 0 else float("nan"))
        return [r if r is not None else "" for r in results]

    def _record(self, out: Any, n: int) -> None:
        self.stats["requests"] += n
        self.stats["response_tokens"] += int(out.lengths.sum())
        self.stats["num_forwards"] += int(out.num_forwards)
        self.stats["row_forwards"] += int(out.row_forwards.sum())
        self.stats["wall_time"] += float(out.wall_time)
