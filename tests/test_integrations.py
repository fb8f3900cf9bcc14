"""The seam to NeMo AutoModel and transformers: registration, NeMo-free inference, version pins,
scoped CPU patches, pre-flight checks, the training dataloader and the training step on NeMo's own
optimizer step."""

from __future__ import annotations

import json
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nemo_bard.callbacks.base import BardCallback
from tests.e2e_utils import run_forked, run_python


# ------------------------------------------------------------------------------ registration
def test_import_nemo_bard_is_light():
    out = run_python("import sys, nemo_bard\n"
                     "print(sorted(m for m in ('torch', 'transformers', 'nemo_automodel') if m in sys.modules))")
    assert out.strip() == "[]"


def test_bard_dir_loads_and_generates_without_nemo(tiny_bard_dir):
    """A bare `import nemo_bard`, the models package, the exporter, the decoders, transformers' Auto classes and
    `model.generate` with NeMo made unimportable."""
    out = run_python(f"""
import sys
sys.modules["nemo_automodel"] = None  # any import of NeMo AutoModel now fails
import nemo_bard
from nemo_bard.models import BardVLForConditionalGeneration, BardVLConfig
import nemo_bard.models.export, nemo_bard.generation
import numpy as np
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from nemo_bard.generation.inputs import build_inputs, user_conversation

model = AutoModelForImageTextToText.from_pretrained({str(tiny_bard_dir)!r}).eval()
processor = AutoProcessor.from_pretrained({str(tiny_bard_dir)!r})
image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
out = model.generate(**build_inputs(processor, [user_conversation("Name the colour.", [image])]), max_new_tokens=8)
print(type(model).__module__, type(model).__name__, tuple(out.sequences.shape), out.num_forwards > 0)
print(sorted(m for m in sys.modules if m.startswith("nemo_automodel") and sys.modules[m] is not None))
""")
    lines = out.strip().splitlines()
    assert lines[-2] == "nemo_bard.models.modeling_bard_vl BardVLForConditionalGeneration (1, 8) True"
    assert lines[-1] == "[]"


def _registration_after_nemo_first(model_dir: str) -> tuple[bool, str]:
    import sys

    from transformers import AutoConfig, AutoModelForImageTextToText

    modules = list(sys.modules)  # in import order
    nemo_first = modules.index("nemo_automodel._transformers.auto_model") < modules.index("nemo_bard")
    config = AutoConfig.from_pretrained(model_dir)
    return nemo_first, (f"{type(config).__name__} {config.block_size} "
                        f"{AutoModelForImageTextToText._model_mapping[type(config)].__name__}")


def test_registration_survives_nemo_imported_first(tiny_bard_dir):
    """NeMo's model module imports transformers' Auto modules in a chain; registration must not break it. Checked
    in a process that imported NeMo's Auto-model module before nemo_bard (the tests' warm server, which every
    forked CLI run also comes from; this test process has the other order: conftest imports nemo_bard first)."""
    nemo_first, found = run_forked(_registration_after_nemo_first, str(tiny_bard_dir))
    assert nemo_first and found == "BardVLConfig 4 BardVLForConditionalGeneration"


# ------------------------------------------------------------------------------ version pins
def test_version_pin_fails_loudly_and_env_downgrades_to_warning(monkeypatch):
    from nemo_bard import integrations

    integrations.check_version("transformers")  # the installed versions are the pinned ones
    integrations.check_version("nemo_automodel")
    monkeypatch.setattr(integrations.importlib.metadata, "version", lambda dist: {"transformers": "5.19.1"}[dist])
    monkeypatch.delenv(integrations.ALLOW_MISMATCH_ENV, raising=False)
    with pytest.raises(integrations.UpstreamVersionError, match=r"transformers 5\.18\.x, but transformers 5\.19\.1"):
        integrations.check_version("transformers")
    monkeypatch.setenv(integrations.ALLOW_MISMATCH_ENV, "1")
    with pytest.warns(RuntimeWarning, match=r"5\.19\.1"):
        integrations.check_version("transformers")
    assert integrations.version_matches("5.18.3", "5.18") and not integrations.version_matches("5.180.0", "5.18")
    assert integrations.version_matches("0.7.0", "0.7.0") and not integrations.version_matches("0.7.1", "0.7.0")


# ------------------------------------------------------------------------------- CPU patches
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_patches_are_scoped_and_reentrant():
    import nemo_automodel._transformers.auto_model as auto_model
    import nemo_automodel.recipes.vlm.finetune as vlm_finetune
    import torch.distributed.run as torchrun

    from nemo_bard.integrations.cpu import cpu_patches

    def targets():
        return (torch.cuda.reset_peak_memory_stats, torch.cuda.current_device, torchrun.determine_local_world_size,
                auto_model.apply_model_infrastructure, vlm_finetune.initialize_distributed)

    before = targets()
    with cpu_patches() as active:
        assert active and torchrun.determine_local_world_size("gpu") == 1
        torch.cuda.reset_peak_memory_stats()
        with cpu_patches():
            assert torch.cuda.current_device() == 0
        assert targets() != before and torch.cuda.current_device() == 0  # the inner exit keeps the outer scope
    assert targets() == before
    with pytest.raises(ValueError, match="Cuda is not available"):
        torchrun.determine_local_world_size("gpu")


def test_missing_patch_target_is_an_error(monkeypatch):
    from nemo_bard.integrations import cpu

    monkeypatch.setattr(cpu, "cpu_only", lambda: True)
    monkeypatch.setattr(cpu, "_patch_targets", lambda: [(types.SimpleNamespace(__name__="fake_module"), "gone",
                                                         lambda original: original)])
    with pytest.raises(RuntimeError, match="fake_module.gone does not exist"):
        with cpu.cpu_patches():
            pass
    assert cpu._depth == 0


# ----------------------------------------------------------------------------------- pre-flight
@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    from nemo_bard.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("seam_colours"), rows=16, seed=2)


LORA = {"_target_": "nemo_automodel.components._peft.lora.PeftConfig", "target_modules": ["*language_model*_proj"]}


def pbm_config(data, **changes) -> dict:
    cfg = {
        "recipe": "nemo_bard.recipes.pbm.BardPBMRecipe",
        "seed": 3,
        "step_scheduler": {"global_batch_size": 4, "local_batch_size": 2, "max_steps": 4},
        "dataset": {"_target_": "nemo_bard.data.datasets.BardChatDataset", "path": str(data)},
        "dataloader": {"_target_": "torchdata.stateful_dataloader.StatefulDataLoader", "num_workers": 0,
                       "collate_fn": {"_target_": "nemo_bard.data.collate.bard_collate_fn"}},
        "bard": {"max_length": 512},
        "block_merge": {"schedule": [{"block_size": 4, "steps": 2}, {"block_size": 8, "steps": 2}]},
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def preflight(cfg: dict):
    from nemo_automodel.components.config.loader import ConfigNode

    from nemo_bard.recipes.pbm import BardPBMRecipe

    recipe = BardPBMRecipe(ConfigNode(cfg))
    recipe.preflight()
    return recipe


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"loss_fn": {"_target_": "nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy"}},
         "loss_fn: BARD recipes compute their own loss"),
        ({"distributed.tp_size": 2}, r"data parallelism \(FSDP2\) only.*got tp_size=2"),
        ({"bard.mask_backnd": "dense"}, "unknown key bard.mask_backnd"),
        ({"bard.noise.type": "gaussian"}, "bard.noise.type: input should be 'stratified_blocks' or 'uniform_sample'"),
        ({"kd": {"top_k": 4}}, "kd is an SWD setting"),
        ({"step_scheduler.max_steps": 5}, "block_merge.schedule steps sum to 4 but step_scheduler.max_steps=5"),
        ({"distributed": {"strategy": "megatron_fsdp", "activation_checkpointing": True}},
         "^distributed.activation_checkpointing=True: NeMo AutoModel 0.7's Megatron-FSDP backend"),
        ({"peft": {**LORA, "use_dora": True}}, "^peft.use_dora=true: NeMo AutoModel cannot merge DoRA"),
        ({"peft": {**LORA, "rank": 8}}, r"^unknown key peft.rank \(valid: target_modules, exclude_modules"),
        ({"peft": {**LORA, "exclude_modules": ["*visual*"]}},
         "^peft.target_modules / peft.exclude_modules / peft.match_all_linear: target_modules and exclude_modules "
         "are mutually exclusive"),
        ({"peft": {"_target_": "torch.nn.Linear", "r": 8}}, r"^peft._target_=torch.nn.modules.linear.Linear: BARD "
         "supports NeMo AutoModel's LoRA"),
        ({"peft": LORA, "quantization": {"load_in_4bit": True}}, "^quantization with peft: NeMo AutoModel cannot merge"),
        pytest.param({"peft": {**LORA, "use_triton": True}}, r"^peft.use_triton=true needs a GPU",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only refusal")),
    ],
)
def test_preflight_refuses_bad_configs(colours, changes, match):
    from nemo_bard.callbacks.block_merge import ScheduleError
    from nemo_bard.recipes.config import BardConfigError

    with pytest.raises((BardConfigError, ScheduleError), match=match):
        preflight(pbm_config(colours, **changes))


def test_preflight_accepts_the_lora_group_and_checkpointing(colours):
    import yaml

    from nemo_bard.integrations import nemo

    lora = yaml.safe_load(open("conf/peft/lora.yaml"))
    assert lora["_target_"] == nemo.LORA_TARGET
    preflight(pbm_config(colours, peft=lora, **{"distributed.activation_checkpointing": True}))


def test_preflight_prepares_loss_and_data_through_nemo_config(colours):
    from nemo_bard.integrations.nemo import BardVlmDataloaderConfig
    from nemo_bard.loss.denoise import MaskedDenoisingLoss

    recipe = preflight(pbm_config(colours, **{"bard.loss": {"reduction": "token_mean"}}))
    loss = recipe.cfg.loss_fn.build()  # what NeMo's setup installs as recipe.loss_fn
    assert isinstance(loss, MaskedDenoisingLoss) and loss.reduction == "token_mean"
    assert isinstance(recipe.cfg.vlm_dataloader, BardVlmDataloaderConfig)
    assert len(recipe.cfg.vlm_dataloader.dataset_config.build()) == 16
    assert [s.block_size for s in recipe.block_merge.stages] == [4, 8] and recipe.callbacks.callbacks == [recipe.block_merge]


def test_dataloader_keeps_options_and_uses_nemo_length_grouped_sampler(colours, tiny_bard_dir):
    from torch.utils.data.distributed import DistributedSampler

    from nemo_bard.integrations.nemo import ColumnLengthGroupedSampler

    options = {"num_workers": 2, "persistent_workers": True, "prefetch_factor": 3, "drop_last": True}
    cfg = pbm_config(colours, **{f"dataloader.{k}": v for k, v in options.items()})
    shards = []
    for rank in (0, 1):
        data = preflight(cfg).cfg.vlm_dataloader
        loader = data.build(pretrained_model_name_or_path=str(tiny_bard_dir), dp_rank=rank, dp_world_size=2,
                            batch_size=2).dataloader
        assert isinstance(loader.sampler, ColumnLengthGroupedSampler)
        assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor, loader.drop_last) == (2, True, 3, True)
        shards.append(list(loader.sampler))
    lengths = loader.dataset.lengths
    assert len(set(lengths)) > 2  # the test data has a spread of lengths
    assert len(shards[0]) == len(shards[1]) == 8 and not set(shards[0]) & set(shards[1])
    for shard in shards:  # every batch holds neighbours of the rank's length-sorted order
        batches = sorted(sorted(lengths[i] for i in shard[k:k + 2]) for k in range(0, 8, 2))
        ordered = sorted((lengths[i] for i in shard), reverse=True)
        assert batches == sorted(sorted(ordered[k:k + 2]) for k in range(0, 8, 2))
    plain = preflight(pbm_config(colours, **{"bard.length_grouped": False})).cfg.vlm_dataloader
    loader = plain.build(pretrained_model_name_or_path=str(tiny_bard_dir), dp_rank=0, dp_world_size=1, batch_size=2)
    assert isinstance(loader.dataloader.sampler, DistributedSampler)


# ------------------------------------------------------------------------------ the training step
class Recorder(BardCallback):
    """Callback that switches the block size at step start and records what it sees."""

    def __init__(self, block_size: int) -> None:
        self.block_size, self.events = block_size, []

    def on_step_start(self, recipe, step):
        recipe.set_block_size(self.block_size)
        self.events.append(("start", step))

    def on_step_end(self, recipe, step, metrics):
        self.events.append(("end", step, dict(metrics)))


def stub_recipe(model, processor, local_batch_size: int, callbacks=(), device="cpu", mask_backend="dense"):
    """A PBM recipe around ``model`` with just the state NeMo's optimizer step reads (SGD, lr 0.5), B = 4."""
    from nemo_bard.recipes.pbm import BardPBMRecipe

    bard = {"max_length": 512, "mask_backend": mask_backend, "flex_compile": mask_backend == "flex", "block_size": 4,
            "seed": 7}
    return BardPBMRecipe.for_model(model, processor, bard, device=device, local_batch_size=local_batch_size,
                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.5), callbacks=tuple(callbacks))


@pytest.fixture(scope="module")
def collated(colours, tiny_processor):
    from nemo_bard.data.collate import bard_collate_fn
    from nemo_bard.data.datasets import BardChatDataset

    ds = BardChatDataset(str(colours))
    return lambda rows: bard_collate_fn([ds[i] for i in rows], tiny_processor)


def fresh_model(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).train()


def test_step_normalises_by_global_samples_and_calls_back_in_order(tiny_bard_dir, tiny_processor, collated):

    model = fresh_model(tiny_bard_dir)
    recorder = Recorder(block_size=8)
    recipe = stub_recipe(model, tiny_processor, local_batch_size=2, callbacks=[recorder])
    batches = [collated([0, 1]), collated([2, 3])]
    recipe.set_block_size(8)
    built, denominator = recipe.prepare_step(batches, step=0)  # the same deterministic layout the step builds
    expected = 0.0
    with torch.no_grad():
        for b in built:
            lm = b.loss_mask
            logits = model(**b.inputs, logits_mask=lm).logits
            ce = F.cross_entropy(logits, b.targets[lm], reduction="none") * b.loss_weights[lm]
            owner = lm.nonzero()[:, 0]
            expected += sum(float(ce[owner == s].mean()) for s in owner.unique())
    samples = sum(int(b.loss_mask.any(-1).sum()) for b in built)  # samples with a masked token, all micro-batches
    assert samples >= 2 and denominator == float(samples)
    recipe.set_block_size(4)  # the callback switches it back to 8 before the step builds its batches
    sample = recipe._run_train_optim_step(batches, max_grad_norm=1.0)
    assert sample.metrics["loss"] == pytest.approx(expected / denominator, rel=1e-5)
    assert sample.metrics["block_size"] == 8 and sample.metrics["num_samples"] == float(samples)
    assert {"grad_norm", "lr", "mem", "tps", "masked_acc", "mean_t", "num_loss_tokens"} <= set(sample.metrics)
    assert [e[:2] for e in recorder.events] == [("start", 0), ("end", 0)]
    assert recorder.events[1][2]["loss"] == sample.metrics["loss"]
    val = recipe._run_validation_epoch(batches)  # fixed noise, token-weighted, through the same forward
    assert val.metrics["num_label_tokens"] > 0 and 0 < val.metrics["val_loss"] < 100
    assert recipe._run_validation_epoch(batches).metrics["val_loss"] == val.metrics["val_loss"]


def test_gradient_accumulation_equals_one_big_batch(tiny_bard_dir, tiny_processor, collated):
    """Two micro-batches of 2 and one of 4 (same samples, same noise): same loss, same update."""
    results = []
    for lbs, batches in ((2, [collated([4, 5]), collated([6, 7])]), (4, [collated([4, 5, 6, 7])])):
        model = fresh_model(tiny_bard_dir)
        sample = stub_recipe(model, tiny_processor, local_batch_size=lbs)._run_train_optim_step(batches, 1.0)
        results.append((sample.metrics["loss"], float(sample.metrics["grad_norm"]), model.lm_head.weight.detach()))
    (loss_a, norm_a, w_a), (loss_b, norm_b, w_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-4)
    torch.testing.assert_close(w_a, w_b, rtol=0, atol=1e-5)
    assert json.dumps(loss_a)  # a plain float, loggable as is


# ------------------------------------------------------------------------------ faults in the training step
def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[k].nan_to_num(7.0), b[k].nan_to_num(7.0)) for k in a)


def test_nonfinite_step_is_skipped_counted_and_too_many_in_a_row_stop(tiny_bard_dir, tiny_processor, collated, tmp_path):
    """A NaN loss/gradient never reaches the weights; bard.max_nonfinite_steps in a row end the
    run with a message naming the fix, once NeMo has logged (and flushed) that step."""
    from nemo_automodel.components.loggers.metric_logger import MetricLogger

    from nemo_bard.errors import TrainingDiverged
    from nemo_bard.integrations.cpu import cpu_patches
    from nemo_bard.recipes.config import parse_bard_settings

    model = fresh_model(tiny_bard_dir)
    recipe = stub_recipe(model, tiny_processor, local_batch_size=2)
    recipe.bard = parse_bard_settings({"max_length": 512, "max_nonfinite_steps": 2})
    recipe.metric_logger_train = MetricLogger(str(tmp_path / "training.jsonl"))
    batches = [collated([0, 1])]

    def poison():
        with torch.no_grad():
            model.lm_head.weight[5, 0] = float("nan")  # NaN logits: NaN loss and gradients

    def step():
        recipe.step_scheduler.step += 1
        sample = recipe._run_train_optim_step(batches, 1.0)
        with cpu_patches():
            recipe.log_train_metrics(sample)
        return sample

    clean = _params(model)
    poison()
    before = _params(model)
    sample = step()
    assert sample.metrics["skipped_steps"] == 1.0 and not torch.isfinite(torch.tensor(sample.metrics["loss"]))
    assert _same(_params(model), before)  # the optimizer did not move anything
    logged = [json.loads(line) for line in (tmp_path / "training.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1]  # on disk at once (row 7: NeMo buffers 100 records)
    with torch.no_grad():
        model.lm_head.weight.copy_(clean["lm_head.weight"])
    sample = step()
    assert sample.metrics["skipped_steps"] == 1.0 and not _same(_params(model), clean)  # a good step trains again
    poison()
    step()  # one bad step: tolerated
    poison()
    with pytest.raises(TrainingDiverged, match=r"2 optimizer steps in a row .* Lower optimizer.lr"):
        step()
    assert [json.loads(line)["step"] for line in (tmp_path / "training.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_micro_batch_of_over_long_rows_is_a_counted_drop(tiny_bard_dir, tiny_processor, tmp_path):
    """A micro-batch whose every row is over bard.max_length runs as an empty micro-batch
    (counted), a step whose every row is dropped is skipped, and neither crashes."""
    from nemo_bard.data.collate import bard_collate_fn
    from nemo_bard.data.datasets import BardChatDataset

    def row(prompt):
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "red and blue"}]}

    rows = [row("What colour? " * 40), row("Name it. " * 40), row("Colour?"), row("Which colour?")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = BardChatDataset(str(tmp_path / "d.jsonl"))
    long_mb, short_mb = (bard_collate_fn([ds[i] for i in pair], tiny_processor) for pair in ((0, 1), (2, 3)))
    model = fresh_model(tiny_bard_dir)
    recipe = stub_recipe(model, tiny_processor, local_batch_size=2)
    recipe.layout.max_length = 64
    assert int(long_mb["prefix_lens"].min()) + 8 > 64 >= int(short_mb["prefix_lens"].max()) + 8
    sample = recipe._run_train_optim_step([long_mb, short_mb], 1.0)
    assert sample.metrics["num_dropped_samples"] == 2 and sample.metrics["num_samples"] >= 1
    assert torch.isfinite(torch.tensor(sample.metrics["loss"])) and "empty_steps" not in sample.metrics
    before = _params(model)
    sample = recipe._run_train_optim_step([long_mb], 1.0)
    assert sample.metrics["num_dropped_samples"] == 2 and sample.metrics["empty_steps"] == 1.0
    assert _same(_params(model), before)


def _logged_step(recipe, batches):
    """One optimizer step through NeMo's logging (where a stop decided in the step is raised), then the next."""
    from nemo_bard.integrations.cpu import cpu_patches

    sample = recipe._run_train_optim_step(batches, 1.0)
    with cpu_patches():
        recipe.log_train_metrics(sample)
    recipe.step_scheduler.step += 1
    return sample


def test_empty_steps_in_a_row_stop_with_the_skip_counts(tiny_bard_dir, tiny_processor, tmp_path):
    """Steps whose every row was skipped (missing images with skip_bad_samples) never train; bard.max_empty_steps of
    them in a row stop the run with a data error (exit 2) naming how many rows were lost."""
    from nemo_automodel.components.loggers.metric_logger import MetricLogger

    from nemo_bard.data.collate import bard_collate_fn
    from nemo_bard.errors import EXIT_USAGE
    from nemo_bard.integrations.guards import EmptyTraining
    from nemo_bard.recipes.config import parse_bard_settings

    model = fresh_model(tiny_bard_dir)
    recipe = stub_recipe(model, tiny_processor, local_batch_size=2)
    recipe.bard = parse_bard_settings({"max_length": 512, "max_empty_steps": 2})
    recipe.metric_logger_train = MetricLogger(str(tmp_path / "training.jsonl"))
    empty = [bard_collate_fn([None, None], tiny_processor)]  # what the dataset gives for two unreadable rows
    before = _params(model)
    assert _logged_step(recipe, empty).metrics["empty_steps"] == 1.0
    with pytest.raises(EmptyTraining, match=r"^no training data reached the model: 2 optimizer steps in a row \(up to "
                       r"step 1, block size 4\) had every row skipped or dropped \(4 skipped for unreadable media"):
        _logged_step(recipe, empty)
    assert EmptyTraining.exit_code == EXIT_USAGE and _same(_params(model), before)


def test_a_stage_that_never_trained_or_ends_diverging_is_not_exported(tiny_bard_dir, tiny_processor, collated,
                                                                        tmp_path):
    """At the last step of a stage, before its checkpoint and export: a stage whose every step was empty stops with a
    data error; one whose last steps were non-finite (weights finite) stops as diverged; both publish nothing."""
    from nemo_automodel.components.loggers.metric_logger import MetricLogger

    from nemo_bard.callbacks.block_merge import BlockMergeCallback
    from nemo_bard.data.collate import bard_collate_fn
    from nemo_bard.errors import TrainingDiverged
    from nemo_bard.integrations.guards import EmptyTraining

    schedule = [{"block_size": 4, "steps": 2}, {"block_size": 8, "steps": 2}]
    model = fresh_model(tiny_bard_dir)
    recipe = stub_recipe(model, tiny_processor, local_batch_size=2)
    recipe.block_merge = BlockMergeCallback(schedule, max_steps=4)
    recipe.metric_logger_train = MetricLogger(str(tmp_path / "training.jsonl"))
    empty = [bard_collate_fn([None, None], tiny_processor)]
    _logged_step(recipe, empty)
    with pytest.raises(EmptyTraining, match=r"every optimizer step from step 0 to 1 had every row skipped or dropped "
                       r"\(4 skipped .*\); the export of stage B=4 \(steps 0-1\) and the checkpoint of step 1 "
                       "were not written"):
        _logged_step(recipe, empty)
    with pytest.raises(EmptyTraining, match="export .*b4 was not written"):  # the export itself refuses too
        recipe.check_trained_since(0, f"the export {tmp_path / 'b4'} was not written")

    model = fresh_model(tiny_bard_dir)  # the same stage, trained, then a NaN loss at its last step
    recipe = stub_recipe(model, tiny_processor, local_batch_size=2)
    recipe.block_merge = BlockMergeCallback(schedule, max_steps=4)
    recipe.metric_logger_train = MetricLogger(str(tmp_path / "training2.jsonl"))
    batches = [collated([0, 1])]
    _logged_step(recipe, batches)  # step 0 trains
    forward_loss = recipe.forward_loss
    recipe.forward_loss = lambda *a, **k: (lambda out: (out[0] * float("nan"), out[1]))(forward_loss(*a, **k))
    with pytest.raises(TrainingDiverged, match=r"^training diverged: the last 1 optimizer step\(s\) before step 2 had "
                       r"a non-finite loss .*; the export of stage B=4 \(steps 0-1\) and the checkpoint of step 1 "
                       "were not written"):
        _logged_step(recipe, batches)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # finite weights: only the guard tells


# ------------------------------------------------------------------------ activation checkpointing
def pbm_grads(model, recipe, batches):
    """Loss and parameter gradients of one PBM micro-batch through the recipe's forward + loss."""
    built, denominator = recipe.prepare_step(batches, step=0)
    loss, _ = recipe.forward_loss(model, built[0], denominator, is_train=True)
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def count_calls(module):
    """Count forward calls of ``module`` (a pre-hook: a recompute in backward stops early, after its inputs)."""
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_activation_checkpointing_gives_identical_loss_and_grads(tiny_bard_dir, tiny_processor, collated):
    """NeMo's activation checkpointing (its world-size-1 FSDP2 path) on the NeMo training class with BARD's dense
    block mask: the attention and MLP of every layer re-run in backward, and loss and gradients are bit-identical
    to the step without it. (Flex: tests/test_gpu.py.)"""
    from nemo_bard.integrations.nemo import (
        NeMoBardVLForConditionalGeneration,
        apply_activation_checkpointing,
        checkpointed_modules,
    )

    batches = [collated([0, 1, 2, 3])]
    results = {}
    for ac in (False, True):
        model = NeMoBardVLForConditionalGeneration.from_pretrained(tiny_bard_dir, dtype=torch.float32).train()
        if ac:
            model = apply_activation_checkpointing(model)
        layer = model.model.language_model.layers[0]
        calls = count_calls(getattr(layer.mlp, "_checkpoint_wrapped_module", layer.mlp))
        results[ac] = (*pbm_grads(model, stub_recipe(model, tiny_processor, local_batch_size=4), batches),
                       calls[0], checkpointed_modules(model))
    (loss, grads, calls, wrapped), (loss_ac, grads_ac, calls_ac, wrapped_ac) = results[False], results[True]
    assert (calls, calls_ac) == (1, 2) and wrapped == 0 and wrapped_ac >= 8  # really recomputed
    assert torch.equal(loss, loss_ac)
    assert grads.keys() == grads_ac.keys() and len(grads) > 10
    assert all(torch.equal(grads[k], grads_ac[k]) for k in grads)


# ------------------------------------------------------------------------------------------- LoRA
def test_merged_lora_state_is_the_adapted_model(tiny_bard_dir, tiny_processor, collated):
    """NeMo's LoRA on the training class, under NeMo's activation checkpointing (wrapped module names): the merged
    state dict is ``W + alpha/dim * B @ A`` on the adapted projections, the base elsewhere, no adapter keys, and a
    plain bard_vl model loaded with it computes what the adapted model computes."""
    from nemo_automodel.components._peft.lora import PeftConfig, apply_lora_to_linear_modules
    from transformers import AutoModelForImageTextToText

    from nemo_bard.integrations.nemo import (
        NeMoBardVLForConditionalGeneration,
        apply_activation_checkpointing,
        merge_lora_state_dict,
    )

    model = NeMoBardVLForConditionalGeneration.from_pretrained(tiny_bard_dir, dtype=torch.float32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_lora_to_linear_modules(model, PeftConfig(target_modules=["*language_model*_proj"], dim=4, alpha=8)) == 14
    with torch.no_grad():  # NeMo starts B at zero; give the adapters an effect
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=g)
    model = apply_activation_checkpointing(model).eval()
    state = model.state_dict()
    merged = merge_lora_state_dict(model, state)
    assert merged.keys() == base.keys() and any("lora_A" in k for k in state)
    q = "model.language_model.layers.1.self_attn.q_proj"
    expected = base[f"{q}.weight"] + 2.0 * state[f"{q}.lora_B.weight"] @ state[f"{q}.lora_A.weight"]
    torch.testing.assert_close(merged[f"{q}.weight"], expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
    plain = AutoModelForImageTextToText.from_pretrained(tiny_bard_dir, dtype=torch.float32).eval()
    plain.load_state_dict(merged)
    b = stub_recipe(plain, tiny_processor, local_batch_size=2).prepare_step([collated([0, 1])], step=0)[0][0]
    inputs = b.inputs
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)
    assert merge_lora_state_dict(model, {}) == {}  # ranks that do not write


def test_rederive_lr_schedule_puts_a_restored_scheduler_on_the_configured_horizon():
    """A finished 8-step run restored under a 12-step config: NeMo's restore keeps the checkpoint's 8-step decay (the
    LR sits at min_lr); re-derived, the LR is the 12-step cosine's at step 8, well above min_lr."""
    from nemo_automodel.components.optim.scheduler import OptimizerParamScheduler

    from nemo_bard.integrations.nemo import BardNeMoRecipe

    def scheduler(decay: int) -> OptimizerParamScheduler:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return OptimizerParamScheduler(opt, init_lr=1e-4, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=1,
                                       lr_decay_steps=decay, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                       wd_incr_steps=decay, wd_incr_style="constant")

    configured, old = scheduler(12), scheduler(8)
    old.step(8)
    configured.load_state_dict(old.state_dict())  # what NeMo's restore does
    assert configured.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    fresh = scheduler(12)
    fresh.step(8)
    recipe = SimpleNamespace(lr_scheduler=[configured], _bard_configured_lr=[(1, 12, 12)])
    assert BardNeMoRecipe.rederive_lr_schedule(recipe) == (8, 12)
    assert configured.num_steps == 8 and configured.lr_decay_steps == 12
    assert configured.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.optimizer.param_groups[0]["lr"])
    assert configured.optimizer.param_groups[0]["lr"] > 2e-4
    assert BardNeMoRecipe.rederive_lr_schedule(recipe) is None  # already on the configured horizon


def test_a_stop_signal_during_an_epochs_first_step_is_seen_after_that_step():
    """NeMo's scheduler asks its signal handler once per step and its epoch loop asks before the epoch's first step;
    a SIGTERM arriving during that step must still stop the run after it (not one step later)."""
    from nemo_automodel.components.training.step_scheduler import StepScheduler

    from nemo_bard.integrations.nemo import repoll_stop_signal

    class Handler:
        received = False

        def signals_received(self):
            return [self.received]

    def scheduler():
        sched = StepScheduler(global_batch_size=1, local_batch_size=1, dp_size=1, dataloader=[{}] * 4,
                              max_steps=8, ckpt_every_steps=100, num_epochs=3, preemption_signal=None)
        sched.sig_handler, sched.step = Handler(), 4  # step 4 starts epoch 1
        assert next(iter(sched.epochs)) is not None  # the epoch loop asked: no signal yet
        sched.sig_handler.received = True  # SIGTERM during step 4
        return sched

    late = scheduler()
    assert not late.is_ckpt_step  # NeMo alone: not seen after this step
    sched = scheduler()
    repoll_stop_signal(sched)  # what the step adapter does after every step
    assert sched.is_ckpt_step and sched.sigterm_flag
