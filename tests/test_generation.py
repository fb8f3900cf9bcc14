"""Block-diffusion decoding: exactness against an uncached reference, fused commit, batching, stats, streaming."""

from __future__ import annotations

import pytest
import torch

from nemo_bard.attention.masks import CLEAN, NOISY, PREFIX, dense_mask
from nemo_bard.generation import (
    GenerationOutput,
    ar_generate,
    block_diffusion_generate,
    select_commits,
    step_schedule,
)
from tests.conftest import random_image

STATIC, DYNAMIC = "low_confidence_static", "low_confidence_dynamic"
# (text, [(image seed, height, width), ...]) -- uneven lengths and image counts
PROMPTS = [
    ("hello", []),
    ("Read the digits.", [(1, 64, 64)]),
    ("Describe the image.", [(2, 64, 64), (3, 64, 96)]),
    ("What is the number? 12 + 7", [(4, 96, 64)]),
]


def encode(processor, items, side: str = "left"):
    """Chat-format prompts with their images, padded on ``side``."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * len(ims) + [{"type": "text", "text": text}]}],
            tokenize=False, add_generation_prompt=True,
        )
        for text, ims in items
    ]
    images = [random_image(s, h, w) for _, ims in items for s, h, w in ims]
    return dict(processor(text=texts, images=images or None, padding=True, padding_side=side, return_tensors="pt"))


class LogitsRecorder:
    """Records every non-empty logits tensor the model produces (i.e. every denoising step)."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.handle = model.lm_head.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if out.numel():
            self.logits.append(out.detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@torch.no_grad()
def reference_decode(model, enc, block_size, steps, strategy, threshold, max_new_tokens, stops, pos_shift=0):
    """Slow reference: full recompute of [prompt | committed blocks | current block] every step, no cache.

    Written from docs/method.md (§2, §4, "Decoding") independently of the decoder (per-position Python, topk, one prompt).
    Returns ``(tokens, logits_per_step, masked_per_step)``: the logits at the still-masked positions of each
    step and those positions.
    """
    ids, mm = enc["input_ids"], enc["mm_token_type_ids"]
    p, mask_id = ids.shape[1], model.config.mask_token_id
    pos_p, _ = model.rope_positions(ids, None, mm, enc.get("image_grid_thw"))
    start = int(pos_p.max()) + 1 + pos_shift
    first = -(-p // block_size)
    resp, all_logits, all_masks = [], [], []
    for k in range(-(-max_new_tokens // block_size)):
        x = torch.full((block_size,), mask_id)
        for n in step_schedule(block_size, steps):
            masked = x == mask_id
            first_stop = next((i for i, t in enumerate(x.tolist()) if t in stops), None)
            if first_stop is not None and not masked[:first_stop].any():
                masked[first_stop:] = False  # everything after a decided stop is cut from the output: no forward
            if not masked.any():
                break
            r = len(resp)
            seq = torch.cat([ids[0], torch.tensor(resp, dtype=torch.long), x])[None]
            kind = torch.tensor([PREFIX] * p + [CLEAN] * r + [NOISY] * block_size)[None]
            ids_of_blocks = [i // block_size for i in range(p)] + [first + j // block_size for j in range(r)]
            block = torch.tensor(ids_of_blocks + [first + k] * block_size)[None]
            pos = torch.cat([pos_p, (start + torch.arange(r + block_size)).view(1, 1, -1).expand(3, 1, -1)], -1)
            logits = model(
                input_ids=seq, attention_mask=dense_mask(kind, block), position_ids=pos,
                pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"),
                mm_token_type_ids=torch.cat([mm[0], torch.zeros(r + block_size, dtype=mm.dtype)])[None],
            ).logits[0, -block_size:]
            all_logits.append(logits[masked].clone())
            all_masks.append(masked.clone())
            logits[:, mask_id] = float("-inf")
            probs = logits.float().softmax(-1)
            pred = probs.argmax(-1)
            conf = torch.where(masked, probs.gather(-1, pred[:, None])[:, 0], torch.tensor(float("-inf")))
            chosen = torch.topk(conf, min(n, int(masked.sum()))).indices.tolist()
            if strategy == DYNAMIC:
                high = [i for i in range(block_size) if masked[i] and conf[i] > threshold]
                if len(high) >= n:
                    chosen = high
            for i in chosen:
                x[i] = pred[i]
        resp += x.tolist()
        if any(t in stops for t in x.tolist()):
            break
    resp = resp[:max_new_tokens]
    cut = next((i + 1 for i, t in enumerate(resp) if t in stops), len(resp))
    return resp[:cut], all_logits, all_masks


CASES = [  # (model, block size, steps, strategy, threshold)
    ("tiny", 2, 2, STATIC, 1.0),  # one token per forward
    ("tiny", 4, 4, DYNAMIC, 1.0),  # tau = 1.0: dynamic degenerates to one token per forward
    ("tiny", 8, 8, STATIC, 1.0),
    ("tiny", 4, 2, STATIC, 1.0),  # two tokens per step
    ("tiny", 8, 3, STATIC, 1.0),  # uneven schedule [3, 3, 2]
    ("sharp", 4, 4, DYNAMIC, 0.5),  # threshold commits several tokens per step
    ("sharp", 8, 8, DYNAMIC, 0.6),
    ("sharp", 8, 4, DYNAMIC, 0.3),
]
ENGINES = ["eager", "static"]


@pytest.fixture(scope="module")
def reference_runs() -> dict[tuple, tuple]:
    """Reference decodes, computed once and shared by both engines' test cases."""
    return {}


def masked_logits(recorded: list[torch.Tensor], engine: str, block_size: int, ref_masks: list[torch.Tensor]):
    """The recorded lm_head outputs at the still-masked positions of each step (batch 1); the decoding loop
    computes the whole block ``[bucket, B, V]``."""
    return [got.reshape(-1, block_size, got.shape[-1])[0][m] for got, m in zip(recorded, ref_masks)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("which,bs,steps,strategy,tau", CASES)
def test_decoder_matches_uncached_reference(
    engine, which, bs, steps, strategy, tau, tiny_bard_model, sharp_model, tiny_processor, reference_runs
):
    model = sharp_model if which == "sharp" else tiny_bard_model
    stops = [model.generation_config.eos_token_id]
    for items in ([PROMPTS[2]], [PROMPTS[1]]):
        enc = encode(tiny_processor, items)
        with LogitsRecorder(model) as rec:
            out = block_diffusion_generate(
                model, **enc, max_new_tokens=16, block_size=bs, denoising_steps=steps,
                remasking_strategy=strategy, confidence_threshold=tau, engine=engine,
            )
        key = (which, bs, steps, strategy, tau, items[0][0])
        if key not in reference_runs:
            reference_runs[key] = reference_decode(model, enc, bs, steps, strategy, tau, 16, stops)
        ref, ref_logits, ref_masks = reference_runs[key]
        assert out.sequences[0, : out.lengths[0]].tolist() == ref
        assert out.num_forwards == len(ref_logits) == len(rec.logits)
        for got, want in zip(masked_logits(rec.logits, engine, bs, ref_masks), ref_logits):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    if which == "sharp":
        assert out.tokens_per_forward > 1.0  # the threshold really committed several tokens per step


def test_reference_comparison_is_position_sensitive(tiny_bard_model, tiny_processor):
    """Positions off by one give different logits, so the reference comparison above can fail."""
    enc = encode(tiny_processor, [PROMPTS[1]])
    args = (tiny_bard_model, enc, 4, 4, STATIC, 1.0, 4, [])
    _, ref_logits, _ = reference_decode(*args)
    _, shifted, _ = reference_decode(*args, pos_shift=1)
    assert (shifted[0] - ref_logits[0]).abs().max() > 1e-3


def free_tokens(model, processor, items, **kw) -> torch.Tensor:
    """Tokens of an eos-free greedy run (24 new tokens, B 4): stop ids for the tests are picked from them."""
    out = block_diffusion_generate(model, **encode(processor, items), max_new_tokens=24, block_size=4,
                                   eos_token_id=[], **kw)
    return out.sequences


def stop_for_different_blocks(free: torch.Tensor, block_size: int = 4) -> int:
    """A token id whose first occurrence falls in the most distinct blocks across the rows of ``free``."""
    def first_blocks(tok):
        return [next((i // block_size for i, t in enumerate(row) if t == tok), None) for row in free.tolist()]
    candidates = sorted(set(free.flatten().tolist()))
    return max(candidates, key=lambda tok: (len(set(first_blocks(tok))), -tok))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("which,strategy,tau", [("tiny", STATIC, 1.0), ("sharp", DYNAMIC, 0.5)])
def test_fused_commit_equals_separate_commit_forward(
    engine, which, strategy, tau, tiny_bard_model, sharp_model, tiny_processor
):
    model = sharp_model if which == "sharp" else tiny_bard_model
    enc = encode(tiny_processor, [PROMPTS[3]])
    kw = dict(max_new_tokens=16, block_size=4, remasking_strategy=strategy, confidence_threshold=tau, eos_token_id=[],
              engine=engine)
    with LogitsRecorder(model) as fused_rec:
        fused = block_diffusion_generate(model, **enc, **kw)
    with LogitsRecorder(model) as sep_rec:
        separate = block_diffusion_generate(model, **enc, **kw, fuse_commit=False)
    assert torch.equal(fused.sequences, separate.sequences)
    assert len(fused_rec.logits) == len(sep_rec.logits) == fused.num_forwards
    for a, b in zip(fused_rec.logits, sep_rec.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert separate.num_forwards == fused.num_forwards + 3  # one commit forward per block but the last
    # a batch whose rows stop at different blocks (rows dropped between blocks) agrees as well
    stop = stop_for_different_blocks(free_tokens(model, tiny_processor, PROMPTS, remasking_strategy=strategy,
                                                 confidence_threshold=tau))
    kw.update(max_new_tokens=24, eos_token_id=None, stop_token_ids=[stop])
    batch = encode(tiny_processor, PROMPTS)
    fused = block_diffusion_generate(model, **batch, **kw)
    separate = block_diffusion_generate(model, **batch, **kw, fuse_commit=False)
    assert torch.equal(fused.sequences, separate.sequences) and torch.equal(fused.lengths, separate.lengths)
    assert len(set(fused.lengths.tolist())) > 2


def _batch_sizes(model):
    """Records the batch size of every forward (prefill included), seen at the token embedding."""
    sizes: list[int] = []
    handle = model.model.language_model.embed_tokens.register_forward_hook(
        lambda mod, args, out: sizes.append(out.shape[0]))
    return sizes, handle


@pytest.fixture(scope="module")
def alone_runs(tiny_bard_model, tiny_processor):
    """A stop id that ends the PROMPTS rows in different blocks, and each prompt decoded alone (eager)."""
    stop = stop_for_different_blocks(free_tokens(tiny_bard_model, tiny_processor, PROMPTS, remasking_strategy=STATIC))
    kw = dict(max_new_tokens=24, block_size=4, remasking_strategy=STATIC, stop_token_ids=[stop], engine="eager")
    return stop, [block_diffusion_generate(tiny_bard_model, **encode(tiny_processor, [item]), **kw) for item in PROMPTS]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_of_uneven_prompts_equals_each_alone(engine, side, tiny_bard_model, tiny_processor, alone_runs):
    model = tiny_bard_model
    stop, alone = alone_runs
    kw = dict(max_new_tokens=24, block_size=4, remasking_strategy=STATIC, stop_token_ids=[stop], engine=engine)
    finish_blocks = [-(-int(o.lengths[0]) // 4) for o in alone]
    assert len(set(finish_blocks)) >= 3  # rows really stop at different blocks

    sizes, handle = _batch_sizes(model)
    try:
        batch = block_diffusion_generate(model, **encode(tiny_processor, PROMPTS, side), **kw)
    finally:
        handle.remove()
    for i, o in enumerate(alone):
        n = int(o.lengths[0])
        assert int(batch.lengths[i]) == n
        assert batch.sequences[i, :n].tolist() == o.sequences[0, :n].tolist()
        assert (batch.sequences[i, n:] == model.generation_config.pad_token_id).all()
        assert int(batch.row_forwards[i]) == o.num_forwards
    assert batch.num_forwards == max(o.num_forwards for o in alone)
    running = [sum(fb > k for fb in finish_blocks) for k in range(max(finish_blocks)) for _ in range(4)]
    # finished rows are masked out; the batch moves to the smallest bucket (4, 2, 1) that holds the rest
    expected = [1 if n == 1 else 2 if n == 2 else 4 for n in running]
    assert sizes == [4] + expected


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("steps", [4, 3])
def test_static_forwards_per_block_equal_steps(engine, steps, tiny_bard_model, tiny_processor):
    enc = encode(tiny_processor, [PROMPTS[1]])
    calls: list[int] = []
    sizes, handle = _batch_sizes(tiny_bard_model)
    try:
        out = block_diffusion_generate(
            tiny_bard_model, **enc, max_new_tokens=16, block_size=4, denoising_steps=steps,
            remasking_strategy=STATIC, eos_token_id=[], streamer=lambda row, toks: calls.append(len(sizes)),
            engine=engine,
        )
    finally:
        handle.remove()
    assert out.num_forwards == 4 * steps and len(sizes) == 1 + 4 * steps  # prefill + S per block, no commit forward
    assert calls == [1 + steps * (k + 1) for k in range(4)]  # every block took exactly S forwards
    assert out.tokens_per_forward == pytest.approx(16 / (4 * steps))


@pytest.mark.parametrize("engine", ENGINES)
def test_mask_token_never_produced(engine, tiny_bard_model, tiny_processor):
    model = tiny_bard_model
    mask_id = model.config.mask_token_id
    wants = []

    def prefer_mask(module, args, out):  # the mask token becomes the argmax at every position
        out = out.clone()
        out[..., mask_id] = out.max(-1).values + 10
        wants.append(bool((out.argmax(-1) == mask_id).all()))
        return out

    handle = model.lm_head.register_forward_hook(prefer_mask)
    try:
        out = block_diffusion_generate(model, **encode(tiny_processor, [PROMPTS[1]]), max_new_tokens=12, block_size=4,
                                       eos_token_id=[], engine=engine)
    finally:
        handle.remove()
    assert wants and all(wants)  # the model wants the mask token...
    assert not (out.sequences == mask_id).any() and out.lengths.tolist() == [12]  # ...and never gets it


def token_only_in_row0(free: torch.Tensor, limit: int) -> tuple[int, int]:
    """``(token, index)``: a token row 0 emits mid-block (index % 4 in 1..2) within ``limit`` tokens, absent from row 1."""
    row0, row1 = free[0, :limit].tolist(), free[1, :limit].tolist()
    for i, tok in enumerate(row0):
        if i >= 4 and i % 4 in (1, 2) and tok not in row0[:i] and tok not in row1:
            return tok, i
    raise AssertionError("no suitable token in the free run")


@pytest.mark.parametrize("engine", ENGINES)
def test_lengths_count_up_to_and_including_eos(engine, tiny_bard_model, tiny_processor):
    enc = encode(tiny_processor, [PROMPTS[0], PROMPTS[1]])
    kw = dict(max_new_tokens=24, block_size=4, engine=engine)
    free = block_diffusion_generate(tiny_bard_model, **enc, eos_token_id=[], **kw)
    eos, at = token_only_in_row0(free.sequences, 24)
    out = block_diffusion_generate(tiny_bard_model, **enc, eos_token_id=eos, pad_token_id=0, **kw)
    assert out.lengths.tolist() == [at + 1, 24]
    assert out.sequences.shape == (2, 24)
    assert out.sequences[0, : at + 1].tolist() == free.sequences[0, : at + 1].tolist() and out.sequences[0, at] == eos
    assert (out.sequences[0, at + 1:] == 0).all()
    blocks0 = at // 4 + 1  # row 0 stopped after the block holding eos; one token per forward at tau 0.9 here
    assert out.row_forwards.tolist() == [4 * blocks0, 24] and out.num_forwards == 24
    assert out.tokens_per_forward == pytest.approx((at + 1 + 24) / (4 * blocks0 + 24))  # per row forward
    assert out.tokens_per_batch_forward == pytest.approx((at + 1 + 24) / 24)


@pytest.mark.parametrize("engine", ENGINES)
def test_streamer_receives_committed_blocks_in_order(engine, tiny_bard_model, tiny_processor):
    from transformers.generation.streamers import BaseStreamer, TextStreamer

    enc = encode(tiny_processor, [PROMPTS[0], PROMPTS[2]])
    kw = dict(block_size=4, engine=engine)
    free = block_diffusion_generate(tiny_bard_model, **enc, max_new_tokens=22, eos_token_id=[], **kw)
    eos, _ = token_only_in_row0(free.sequences, 22)
    got: list[tuple[int, list[int]]] = []
    out = block_diffusion_generate(tiny_bard_model, **enc, max_new_tokens=22, eos_token_id=eos,
                                   streamer=lambda row, toks: got.append((row, toks)), **kw)
    for row in range(2):
        blocks = [t for r, t in got if r == row]
        assert sum(blocks, []) == out.sequences[row, : out.lengths[row]].tolist()
        assert all(len(b) == 4 for b in blocks[:-1])
    assert [len(t) for r, t in got if r == 1][-1] == 2  # max_new_tokens=22 cuts the last block
    assert [len(t) for r, t in got if r == 0][-1] < 4  # row 0's last block is cut after its eos

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended += 1

    single = encode(tiny_processor, [PROMPTS[1]])
    rec = Recorder()
    out = block_diffusion_generate(tiny_bard_model, **single, max_new_tokens=12, streamer=rec, **kw)
    assert rec.puts[0] == single["input_ids"].tolist()  # the prompt first, as HF generate does
    assert sum(rec.puts[1:], []) == out.sequences[0, : out.lengths[0]].tolist() and rec.ended == 1
    with pytest.raises(ValueError, match="batch size 1"):
        block_diffusion_generate(tiny_bard_model, **enc, max_new_tokens=4, streamer=Recorder(), engine=engine)
    text = TextStreamer(tiny_processor.tokenizer, skip_prompt=True)  # HF's own streamer works as is
    block_diffusion_generate(tiny_bard_model, **single, max_new_tokens=8, streamer=text, **kw)


def test_model_generate_delegates_and_defaults(tiny_bard_model, tiny_processor):
    enc = encode(tiny_processor, [PROMPTS[1]])
    out = tiny_bard_model.generate(**enc, max_new_tokens=8)
    assert isinstance(out, GenerationOutput)
    same = block_diffusion_generate(
        tiny_bard_model, **enc, max_new_tokens=8, block_size=4, denoising_steps=4,
        remasking_strategy=DYNAMIC, confidence_threshold=0.9,
    )
    assert torch.equal(out.sequences, same.sequences) and out.num_forwards == same.num_forwards
    assert out.wall_time > 0 and 0 < out.prefill_time < out.wall_time


@pytest.mark.parametrize("engine", ENGINES)
def test_sampling_is_seeded_and_top_k_1_is_greedy(engine, tiny_bard_model, tiny_processor):
    enc = encode(tiny_processor, [PROMPTS[1]])
    kw = dict(max_new_tokens=12, block_size=4, eos_token_id=[], engine=engine)
    a = block_diffusion_generate(tiny_bard_model, **enc, **kw, temperature=1.0, seed=3)
    b = block_diffusion_generate(tiny_bard_model, **enc, **kw, temperature=1.0, seed=3)
    c = block_diffusion_generate(tiny_bard_model, **enc, **kw, temperature=1.0, seed=4)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    greedy = block_diffusion_generate(tiny_bard_model, **enc, **kw)
    top1 = block_diffusion_generate(tiny_bard_model, **enc, **kw, temperature=0.7, top_k=1, seed=0)
    nucleus = block_diffusion_generate(tiny_bard_model, **enc, **kw, temperature=0.7, top_p=1e-6, seed=0)
    assert torch.equal(greedy.sequences, top1.sequences) and torch.equal(greedy.sequences, nucleus.sequences)


def test_schedule_and_commit_rules():
    assert step_schedule(32, 32) == [1] * 32
    assert step_schedule(8, 3) == [3, 3, 2]
    assert step_schedule(32, 5) == [7, 7, 6, 6, 6]
    conf = torch.tensor([[0.95, 0.2, 0.91, 0.5], [0.95, 0.2, 0.3, float("-inf")], [0.9, 0.1, 0.2, 0.3]])
    masked = conf > float("-inf")
    static = select_commits(conf, masked, 1, STATIC, 0.9)
    assert static.tolist() == [[True, False, False, False], [True, False, False, False], [True, False, False, False]]
    dyn = select_commits(conf, masked, 1, DYNAMIC, 0.9)
    # row 0: two above tau; row 1: one above tau (>= n); row 2: 0.9 is not > 0.9 -> the top-1
    assert dyn.tolist() == [[True, False, True, False], [True, False, False, False], [True, False, False, False]]
    assert select_commits(conf, masked, 3, DYNAMIC, 0.9)[0].tolist() == [True, False, True, True]  # 2 < n: top-3
    assert select_commits(conf, masked, 4, STATIC, 0.9)[1].tolist() == [True, True, True, False]  # clamp to masked


@pytest.mark.parametrize("engine", ["static", "hf"])
def test_ar_baseline_greedy(engine, tiny_ar_dir, tiny_processor):
    from transformers import AutoModelForImageTextToText

    ar = AutoModelForImageTextToText.from_pretrained(tiny_ar_dir, dtype=torch.float32).eval()
    for item in (PROMPTS[0], PROMPTS[1]):
        enc = encode(tiny_processor, [item])
        out = ar_generate(ar, **enc, max_new_tokens=8, eos_token_id=[], engine=engine)
        assert out.lengths.tolist() == [8] and out.num_forwards == 8 and out.tokens_per_forward == 1.0
        assert out.decode_forwards == 7 and out.engine == engine
        ref = ar.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
        assert out.sequences[0].tolist() == ref.tolist()
    batch = ar_generate(ar, **encode(tiny_processor, PROMPTS[:2]), max_new_tokens=8, eos_token_id=[], engine=engine)
    assert batch.sequences.shape == (2, 8) and batch.sequences[1].tolist() == out.sequences[0].tolist()


def test_undecided_leaves_positions_after_a_decided_stop():
    from nemo_bard.generation.sampling import undecided

    m, e = 9, 2  # mask id, stop id
    x = torch.tensor([[5, e, m, m],   # stop decided, nothing masked before it: done
                      [m, e, m, m],   # a masked position before the stop: all masked positions still count
                      [5, 6, 7, m],   # no stop yet
                      [e, m, e, m]])  # the first stop counts
    want = torch.tensor([[0, 0, 0, 0], [1, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(undecided(x, m, torch.tensor([e])), want)
    assert torch.equal(undecided(x, m, torch.tensor([e, m])), want)  # a masked position is never a stop
    assert torch.equal(undecided(x, m, torch.tensor([], dtype=torch.long)), x == m)  # no stop ids: every mask


@pytest.mark.parametrize("engine", ENGINES)
def test_no_forward_after_a_decided_stop(engine, sharp_model, tiny_processor):
    """With every token a stop id, a row ends as soon as its first position is decided: the same tokens and the
    same forwards as the uncached reference (which applies the rule on its own), fewer than the block's 8."""
    mask_id = sharp_model.config.mask_token_id
    stops = [t for t in range(sharp_model.config.get_text_config().vocab_size) if t != mask_id]
    forwards = []
    for items in ([PROMPTS[0]], [PROMPTS[2]]):
        enc = encode(tiny_processor, items)
        out = block_diffusion_generate(sharp_model, **enc, max_new_tokens=8, block_size=8, denoising_steps=8,
                                       remasking_strategy=STATIC, eos_token_id=stops, engine=engine)
        ref, ref_logits, _ = reference_decode(sharp_model, enc, 8, 8, STATIC, 1.0, 8, stops)
        assert out.lengths.tolist() == [1] and out.sequences[0, :1].tolist() == ref[:1]
        assert out.num_forwards == len(ref_logits)
        forwards.append(out.num_forwards)
        also_mask = block_diffusion_generate(sharp_model, **enc, max_new_tokens=8, block_size=8, denoising_steps=8,
                                             remasking_strategy=STATIC, eos_token_id=stops + [mask_id], engine=engine)
        assert torch.equal(also_mask.sequences, out.sequences)  # the mask id as a stop id changes nothing
    assert min(forwards) < 8, forwards  # the full denoising of the block takes 8


@pytest.mark.parametrize("engine", ENGINES)
def test_a_block_ends_when_the_positions_it_returns_are_decided(engine, tiny_bard_model, tiny_processor):
    """max_new_tokens 2 with B 16, S 16 (one token per step): once positions 0 and 1 are decided the block is done
    (2 forwards, not 16), and the two tokens are those of the full block's denoising."""
    model = tiny_bard_model
    positions = torch.arange(16)

    def front_first(module, args, out):  # confidence falls with the position: position j is decided at step j + 1
        out = out.clone()
        top = out.argmax(-1, keepdim=True)
        bonus = (40.0 - 2.0 * positions[-out.shape[-2]:]).view(*([1] * (out.dim() - 2)), -1, 1)
        return out.scatter_add(-1, top, bonus.expand_as(top).to(out.dtype))

    handle = model.lm_head.register_forward_hook(front_first)
    try:
        kw = dict(block_size=16, denoising_steps=16, remasking_strategy=STATIC, eos_token_id=[], engine=engine)
        enc = encode(tiny_processor, [PROMPTS[1]])
        full = block_diffusion_generate(model, **enc, max_new_tokens=16, **kw)
        short = block_diffusion_generate(model, **enc, max_new_tokens=2, **kw)
    finally:
        handle.remove()
    assert full.num_forwards == 16 and short.num_forwards == 2 and short.row_forwards.tolist() == [2]
    assert short.sequences[0].tolist() == full.sequences[0, :2].tolist()


def test_a_mistyped_processor_output_is_refused_not_ignored(tiny_bard_model, tiny_processor):
    """The processor's outputs travel as one mapping; a key the decoder does not read is an error naming it (an
    image passed as ``pixel_value`` would otherwise be decoded as a text-only prompt)."""
    enc = dict(encode(tiny_processor, PROMPTS[:1]))
    enc["pixel_value"] = torch.zeros(1)
    with pytest.raises(TypeError, match="unexpected processor output 'pixel_value'; the decoder reads input_ids"):
        block_diffusion_generate(tiny_bard_model, **enc, max_new_tokens=4)
