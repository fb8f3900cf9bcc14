"""The schema of the BARD config sections: ``bard:``, ``block_merge:`` and ``kd:``.

One place for their defaults, allowed values and unknown-key errors. Every error is a
:class:`BardConfigError` whose one-line message names the key (``bard.noise.type``,
``block_merge.schedule.1.steps``, ``unknown key kd.topk``...). Also the checks of a whole recipe config
that need no model (:func:`check_recipe_config`: training setup, schedule, dataset / model / SWD
teacher paths and their config.json). Light to import (pydantic only, no torch), so a front end can
validate a config before any heavy import.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from nemo_bard.callbacks.block_merge import parse_schedule
from nemo_bard.errors import BardConfigError
from nemo_bard.models.constants import DEFAULT_BLOCK_SIZE, DEFAULT_MASK_TOKEN_ID
from nemo_bard.models.paths import ModelPathError, read_model_config, tokenizer_vocab
from nemo_bard.models.verify import verify_model_dir
from nemo_bard.schema import LossSettings, NoiseSettings, Section


class BardSettings(Section):
    """``bard:`` section.

    ``block_size``: training block size when no ``block_merge`` schedule is given (default: the model
    config's ``block_size``). ``mask_token_id`` defaults to the model config's. ``length_grouped``
    batches samples of similar length when the dataset has a ``length`` column. Exports (stage and final)
    are sharded into safetensors files of at most ``export_max_shard_size``. An optimizer step whose loss
    or gradients are not finite is skipped; ``max_nonfinite_steps`` such steps in a row stop the run (exit 3).
    A step whose every row was skipped (unreadable media) or dropped (over ``max_length``) is skipped too;
    ``max_empty_steps`` such steps in a row, or a whole stage of them, stop the run (exit 2) before any export.
    ``verify_checksums``: at the start of a run, hash the model's (and the SWD teacher's) weight files and compare
    them with the sha256 their export recorded (~13 s per 16 GB; the structure check always runs).
    """

    block_size: int | None = Field(None, ge=1)
    mask_token_id: int | None = Field(None, ge=0)
    response_pad_token: str = "<|im_end|>"
    max_length: int | None = Field(8192, ge=2)
    clean_attention: Literal["block_causal", "causal"] = "block_causal"
    mask_backend: Literal["dense", "flex"] = "dense"
    flex_compile: bool = False
    noise: NoiseSettings = Field(default_factory=NoiseSettings)
    loss: LossSettings = Field(default_factory=LossSettings)
    length_grouped: bool = True
    export_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    export_max_shard_size: str = "5GB"
    export_final: bool = True
    seed: int | None = None
    max_nonfinite_steps: int = Field(5, ge=1)
    max_empty_steps: int = Field(10, ge=1)
    verify_checksums: bool = True

    @model_validator(mode="after")
    def _fits_two_blocks(self) -> "BardSettings":
        if self.max_length is not None and self.max_length < 2 * (self.block_size or 1):
            raise ValueError(f"max_length={self.max_length} is shorter than two blocks of block_size={self.block_size}")
        return self


class ScheduleStage(Section):
    """One ``block_merge.schedule`` entry."""

    block_size: int = Field(ge=1)
    steps: int = Field(ge=1)


class BlockMergeSettings(Section):
    """``block_merge:`` (PBM): the block-size schedule and what happens at each stage boundary."""

    schedule: list[ScheduleStage] = Field(min_length=1)
    reset_lr_schedule: bool = False
    reset_optimizer: bool = False
    export_stages: bool = True
    export_dir: str | None = None

    @model_validator(mode="after")
    def _merges_whole_blocks(self) -> "BlockMergeSettings":
        parse_schedule([stage.model_dump() for stage in self.schedule])  # growing sizes that divide each other
        return self


class KDSettings(Section):
    """``kd:`` (SWD): top-k distillation from the frozen anchor (reference: top-16 forward KL, weights 1.0 / 0.5).

    ``teacher_block_size`` defaults to the teacher checkpoint's recorded ``block_size``.
    """

    top_k: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    direction: Literal["forward", "reverse"] = "forward"
    ce_weight: float = Field(1.0, ge=0.0)
    kd_weight: float = Field(0.5, ge=0.0)
    teacher_block_size: int | None = Field(None, ge=1)


class BardSections(Section):
    """The three BARD sections of a recipe config (each optional; ``bard:`` gets its defaults)."""

    bard: BardSettings = Field(default_factory=BardSettings)
    block_merge: BlockMergeSettings | None = None
    kd: KDSettings | None = None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section model that owns the key at ``loc`` (for listing its valid keys)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        for cand in candidates:
            cand = getattr(cand, "__args__", (cand,))[0] if getattr(cand, "__origin__", None) is list else cand
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return None
    return model


def _describe(error: dict, root: type[BaseModel]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _model_at(root, loc[:-1])
        valid = f" (valid: {', '.join(owner.model_fields)})" if owner is not None else ""
        return f"unknown key {key}{valid}"
    if kind == "value_error":
        message = str(error.get("ctx", {}).get("error", error["msg"]))
        return message if message.startswith(key.split(".")[0]) else f"{key}: {message}"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {error['msg'][0].lower()}{error['msg'][1:]}{shown}"


def config_error(exc: ValidationError, root: type[BaseModel] = BardSections) -> BardConfigError:
    """One-line :class:`BardConfigError` for a pydantic validation error."""
    return BardConfigError("; ".join(_describe(e, root) for e in exc.errors()))


def parse_sections(raw: dict[str, Any]) -> BardSections:
    """Validate the ``bard:``, ``block_merge:`` and ``kd:`` sections of a (plain dict) recipe config."""
    data = {k: raw.get(k) for k in BardSections.model_fields if raw.get(k) is not None}
    try:
        return BardSections.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc) from None


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def check_training_setup(cfg: dict[str, Any]) -> None:
    """What BARD cannot train with: a ``loss_fn:`` section, model parallelism, a schedule that does not
    match ``step_scheduler.max_steps``."""
    if cfg.get("loss_fn") is not None:
        raise BardConfigError(
            "loss_fn: BARD recipes compute their own loss (configure it under bard.loss, and kd: for SWD); "
            "remove the loss_fn section"
        )
    sizes = {k: int(_get(cfg, f"distributed.{k}") or 1) for k in ("tp_size", "cp_size", "pp_size", "ep_size")}
    if any(v > 1 for v in sizes.values()):
        raise BardConfigError(
            "BARD recipes shard by data parallelism (FSDP2) only: the block masks cannot be split across "
            f"tensor/context/pipeline/expert-parallel ranks; set {', '.join(f'distributed.{k}=1' for k in sizes)} "
            f"(got {', '.join(f'{k}={v}' for k, v in sizes.items() if v > 1)})"
        )
    schedule = _get(cfg, "block_merge.schedule")
    max_steps = _get(cfg, "step_scheduler.max_steps")
    if schedule and max_steps is not None:
        parse_schedule(list(schedule), int(max_steps))


def check_paths(cfg: dict[str, Any], checksums: bool = False) -> None:
    """Files the run needs: the dataset path(s), the model directory (a bard_vl checkpoint whose safetensors
    files are intact: :func:`~nemo_bard.models.verify.verify_model_dir`, with their recorded sha256 when
    ``checksums``) and, for SWD, the teacher directory. Local paths only; Hub ids are left to the loaders."""
    data = _get(cfg, "dataset.path")
    for p in data if isinstance(data, (list, tuple)) else [data] if data is not None else []:
        if not os.path.exists(str(p)):
            raise BardConfigError(
                f"dataset path {p} does not exist; set paths.data (dataset.path) to a save_to_disk directory or .jsonl"
            )
    swd = _get(cfg, "teacher_model") is not None
    for key, fix in (("model", "convert an AR Qwen3-VL first (python -m nemo_bard.convert --src DIR --dst OUT) "
                               "or set paths.model (model.pretrained_model_name_or_path)"),
                     ("teacher_model", "run PBM first (its stage exports are <run>/stages/b<B>) or set paths.teacher "
                                       "(teacher_model.pretrained_model_name_or_path)")):
        path = _get(cfg, f"{key}.pretrained_model_name_or_path")
        if path is None:
            continue
        role = {"model": "SWD student" if swd else "model", "teacher_model": "SWD teacher"}[key]
        if swd and key == "model":
            fix = ("run PBM first (its stage exports are <run>/stages/b<B>) or set paths.student "
                   "(model.pretrained_model_name_or_path)")
        config = read_model_config(str(path), role, fix)
        if config is not None and config.get("model_type") != "bard_vl":
            raise BardConfigError(
                f"{role} {path} is a {config.get('model_type')!r} checkpoint; BARD training needs a bard_vl model. "
                f"Convert it first: python -m nemo_bard.convert --src {path} --dst OUT"
            )
        if config is not None:
            verify_model_dir(str(path), checksums=checksums, what=role)



def _tokenizer_vocab(path: str) -> dict[str, int] | None:
    try:
        return tokenizer_vocab(path, f"re-export {path}")
    except ModelPathError as exc:
        raise BardConfigError(str(exc)) from None


def check_teacher_student(student_path: str, teacher_path: str, student_block: int | None,
                          teacher_block: int | None, hub: bool = True) -> tuple[int, int] | None:
    """SWD pre-flight on the two models' config.json (and tokenizer.json when local), no model loaded: both
    bard_vl, same vocabulary, tokenizer and mask id, teacher block size dividing the student's. Returns
    (student B, teacher B). A Hugging Face Hub id is read with transformers' ``get_config_dict`` when ``hub``, else
    the check is left to a later call (returns None); local directories need neither torch nor transformers."""
    cfgs = {}
    for role, path in (("student", student_path), ("teacher", teacher_path)):
        key = "paths.student (model" if role == "student" else "paths.teacher (teacher_model"
        try:
            cfg = read_model_config(path, f"SWD {role}", f"run PBM first (its stage exports are <run>/stages/b<B>) "
                                                         f"or set {key}.pretrained_model_name_or_path)")
        except ModelPathError as exc:
            raise BardConfigError(str(exc)) from None
        if cfg is None:  # a Hugging Face Hub id
            if not hub:
                return None
            # transformers: ~8 s, only for a Hub id
            from transformers import PreTrainedConfig

            try:
                cfg = PreTrainedConfig.get_config_dict(path)[0]  # the raw config.json: no model class needed
            except (OSError, ValueError) as exc:
                raise BardConfigError(f"SWD {role} {path!r} is not a local directory and cannot be loaded from the "
                                      f"Hugging Face Hub: {exc}") from None
        if cfg.get("model_type") != "bard_vl":
            raise BardConfigError(
                f"SWD {role} {path} is model_type {cfg.get('model_type')!r}, not bard_vl. Convert it first: "
                f"python -m nemo_bard.convert --src {path} --dst <out> --block-size <B>"
            )
        cfgs[role] = {"vocab_size": (cfg.get("text_config") or {}).get("vocab_size", 151936),
                      "mask_token_id": cfg.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
                      "block_size": cfg.get("block_size", DEFAULT_BLOCK_SIZE)}
    s, t = cfgs["student"], cfgs["teacher"]
    if s["vocab_size"] != t["vocab_size"] or s["mask_token_id"] != t["mask_token_id"]:
        raise BardConfigError(
            f"teacher and student vocabularies differ: student {student_path} (vocab_size {s['vocab_size']}, "
            f"mask_token_id {s['mask_token_id']}) vs teacher {teacher_path} (vocab_size {t['vocab_size']}, "
            f"mask_token_id {t['mask_token_id']}); SWD needs the same tokenizer"
        )
    s_vocab, t_vocab = _tokenizer_vocab(student_path), _tokenizer_vocab(teacher_path)
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise BardConfigError(
            f"teacher and student tokenizers differ: student {student_path} ({len(s_vocab)} tokens) vs teacher "
            f"{teacher_path} ({len(t_vocab)} tokens); SWD needs the same tokenizer/vocabulary"
        )
    b_s = int(student_block or s["block_size"])
    b_t = int(teacher_block or t["block_size"])
    if b_s % b_t:
        raise BardConfigError(
            f"teacher block size {b_t} does not divide student block size {b_s}; SWD distills a small-block "
            "anchor into a larger block (e.g. teacher 4, student 8/16/32)"
        )
    return b_s, b_t


def _without_targets(node: Any) -> Any:
    """``node`` without its ``_target_`` entries (NeMo's loader turns them into the objects they name, the front end
    keeps the strings; the checks read neither), so one config looks the same to both."""
    if isinstance(node, dict):
        return {k: _without_targets(v) for k, v in node.items() if k != "_target_"}
    if isinstance(node, list):
        return [_without_targets(v) for v in node]
    return node


# The top-level keys of a recipe config that check_recipe_config reads.
CHECKED_KEYS = ("bard", "block_merge", "kd", "loss_fn", "distributed", "step_scheduler", "dataset", "model",
                "teacher_model")
_checked: dict[str, BardSections] = {}


def check_recipe_config(cfg: dict[str, Any]) -> BardSections:
    """Every check of a (plain dict) BARD recipe config that needs no model, torch or NeMo: the sections'
    schema, the training setup and the files (model and teacher weights with their recorded sha256 when
    ``bard.verify_checksums``); returns the typed sections.

    Each config is checked once per process: the command line front end runs this before any heavy import, and
    the recipe's pre-flight (which also serves NeMo-style launches) gets the same sections without checking them
    again."""
    key = json.dumps({k: _without_targets(cfg.get(k)) for k in CHECKED_KEYS}, sort_keys=True, default=str)
    if key not in _checked:
        sections = parse_sections(cfg)
        check_training_setup(cfg)
        check_paths(cfg, checksums=sections.bard.verify_checksums)
        student = _get(cfg, "model.pretrained_model_name_or_path")
        teacher = _get(cfg, "teacher_model.pretrained_model_name_or_path")
        if student is not None and teacher is not None:
            kd = sections.kd.teacher_block_size if sections.kd is not None else None
            check_teacher_student(str(student), str(teacher), sections.bard.block_size, kd, hub=False)
        _checked[key] = sections
    return _checked[key].model_copy(deep=True)


def parse_bard_settings(raw: dict[str, Any] | None) -> BardSettings:
    """Validate and type the ``bard:`` section alone."""
    return parse_sections({"bard": raw or {}}).bard


def to_plain(node: Any) -> Any:
    """ConfigNode / nested containers -> plain Python (dicts, lists, scalars)."""
    if hasattr(node, "to_dict"):
        return node.to_dict()
    if isinstance(node, dict):
        return {k: to_plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [to_plain(v) for v in node]
    return node


__all__ = [
    "BardConfigError",
    "BardSections",
    "BardSettings",
    "BlockMergeSettings",
    "check_paths",
    "CHECKED_KEYS",
    "check_recipe_config",
    "check_teacher_student",
    "check_training_setup",
    "KDSettings",
    "LossSettings",
    "NoiseSettings",
    "ScheduleStage",
    "config_error",
    "parse_bard_settings",
    "parse_sections",
    "to_plain",
]
