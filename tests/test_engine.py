"""The decoding engine: the lean layers token for token against transformers' own (engine="eager"), buckets,
sessions, errors."""

from __future__ import annotations

import pytest
import torch

from nemo_bard.generation import (
    BlockDiffusionSession,
    DecodeEngine,
    EngineError,
    RowRequest,
    StaticKVCache,
    ar_generate,
    block_diffusion_generate,
)
from nemo_bard.generation.decode import model_inputs
from tests.test_generation import DYNAMIC, PROMPTS, STATIC, encode, stop_for_different_blocks

# a mixed batch of 8: text-only and image prompts of different lengths
BATCH8 = PROMPTS + [("yes", []), ("Count the red squares.", [(5, 64, 64)]), ("a b c d e f g h", []),
                    ("Describe the top left of the picture.", [(6, 96, 96)])]


def _stops_mid_run(model, enc, **kw) -> list[int]:
    """A stop id that ends the rows of ``enc`` in different blocks (picked from a free run)."""
    free = block_diffusion_generate(model, **enc, eos_token_id=[], engine="eager", **kw).sequences
    return [stop_for_different_blocks(free, kw["block_size"])]


PARITY = [  # (block size, steps, strategy, threshold)
    (4, 4, STATIC, 1.0), (4, 2, DYNAMIC, 0.5), (8, 3, STATIC, 1.0), (8, 8, DYNAMIC, 0.9),
    (16, 16, DYNAMIC, 0.5), (16, 4, DYNAMIC, 0.2), (32, 32, DYNAMIC, 0.3), (32, 8, STATIC, 1.0),
]


@pytest.mark.parametrize("bs,steps,strategy,tau", PARITY)
def test_engine_tokens_equal_eager_decoder(bs, steps, strategy, tau, sharp_model, tiny_processor):
    """Greedy, fp32: same tokens, lengths and forward counts as engine='eager', for batch 1 (text, image) and a
    mixed batch of 8 whose rows stop in different blocks."""
    kw = dict(max_new_tokens=2 * bs + 3, block_size=bs, denoising_steps=steps, remasking_strategy=strategy,
              confidence_threshold=tau)
    batch = encode(tiny_processor, BATCH8)
    stops = _stops_mid_run(sharp_model, batch, **kw)
    for enc in (encode(tiny_processor, [PROMPTS[0]]), encode(tiny_processor, [PROMPTS[2]]), batch):
        eager = block_diffusion_generate(sharp_model, **enc, eos_token_id=stops, engine="eager", **kw)
        static = block_diffusion_generate(sharp_model, **enc, eos_token_id=stops, engine="static", **kw)
        assert torch.equal(static.sequences, eager.sequences) and torch.equal(static.lengths, eager.lengths)
        assert static.num_forwards == eager.num_forwards
        assert torch.equal(static.row_forwards, eager.row_forwards)
    assert len(set(eager.lengths.tolist())) > 2  # the batch's rows really stopped at different points


def test_session_api_steps_and_collects_blocks(tiny_bard_model, tiny_processor):
    """add -> step -> collect (what the server's scheduler drives) gives the blocks and output of
    block_diffusion_generate."""
    enc = encode(tiny_processor, PROMPTS[:2])
    kw = dict(max_new_tokens=10, block_size=4, eos_token_id=[])
    ref = block_diffusion_generate(tiny_bard_model, **enc, **kw)
    engine = DecodeEngine.for_model(tiny_bard_model)
    inputs = model_inputs(engine.device, **enc)
    session = BlockDiffusionSession(engine, rows=2, capacity=128, block_size=4, schedule=[1, 1, 1, 1],
                                    mask_token_id=tiny_bard_model.config.mask_token_id, stops=[], pad=0,
                                    strategy=DYNAMIC, threshold=0.9)
    requests = [RowRequest("a", 10), RowRequest("b", 10)]
    session.add(requests, inputs)
    blocks: dict[str, list[list[int]]] = {"a": [], "b": []}
    while session.running:
        session.step()
        for key, tokens in session.collect():
            blocks[key].append(tokens)
    assert [r.finish_reason for r in session.take_finished()] == ["length", "length"]
    assert session.num_forwards == ref.num_forwards <= 12  # the last block ends once its 2 returned tokens are set
    for i, key in enumerate("ab"):
        assert [len(b) for b in blocks[key]] == [4, 4, 2]  # three blocks, the last cut at max_new_tokens
        assert sum(blocks[key], []) == ref.sequences[i].tolist() == requests[i].tokens
    with pytest.raises(EngineError, match="one session at a time"):  # a second session on held buffers is refused
        BlockDiffusionSession(engine, rows=2, capacity=128, block_size=4, schedule=[4], mask_token_id=1, stops=[0],
                              pad=0, strategy=STATIC, threshold=1.0)
    session.close()


def test_streamed_prefixes_are_the_same_tokens_sooner(sharp_model, tiny_processor):
    """``stream_prefix`` returns a block's leading decided positions after each forward (what the server streams):
    the same tokens as block by block, every token at the same forward or earlier, and some strictly earlier."""
    enc = encode(tiny_processor, PROMPTS[:3])
    engine = DecodeEngine.for_model(sharp_model)
    inputs = model_inputs(engine.device, **enc)
    kw = dict(rows=4, capacity=128, block_size=8, schedule=[1] * 8, mask_token_id=sharp_model.config.mask_token_id,
              stops=[], pad=0, strategy=DYNAMIC, threshold=0.9)
    runs = {}
    for stream in (False, True):
        session = BlockDiffusionSession(engine, stream_prefix=stream, **kw)
        session.add([RowRequest(i, 20) for i in range(3)], inputs)
        when: dict[int, list[int]] = {i: [] for i in range(3)}  # the forward at which each token was returned
        tokens: dict[int, list[int]] = {i: [] for i in range(3)}
        while session.running:
            session.step()
            for key, new in session.collect():
                tokens[key] += new
                when[key] += [session.num_forwards] * len(new)
        runs[stream] = (tokens, when, session.num_forwards)
        session.close()
    (blocks, at_block_end, forwards), (streamed, streamed_at, streamed_forwards) = runs[False], runs[True]
    assert streamed == blocks and forwards == streamed_forwards and all(len(t) == 20 for t in blocks.values())
    pairs = [(s, b) for i in range(3) for s, b in zip(streamed_at[i], at_block_end[i])]
    assert all(s <= b for s, b in pairs) and any(s < b for s, b in pairs)


def test_ar_engine_batch_equals_each_alone_and_hf(tiny_ar_dir, tiny_processor):
    from transformers import AutoModelForImageTextToText

    ar = AutoModelForImageTextToText.from_pretrained(tiny_ar_dir, dtype=torch.float32).eval()
    alone = [ar_generate(ar, **encode(tiny_processor, [p]), max_new_tokens=12, eos_token_id=[]) for p in PROMPTS]
    stop = int(alone[1].sequences[0, 5])  # row 1 stops at its 6th token; the others when they emit it (or never)
    alone = [ar_generate(ar, **encode(tiny_processor, [p]), max_new_tokens=12, eos_token_id=stop) for p in PROMPTS]
    batch = ar_generate(ar, **encode(tiny_processor, PROMPTS), max_new_tokens=12, eos_token_id=stop)
    for i, o in enumerate(alone):
        n = int(o.lengths[0])
        assert int(batch.lengths[i]) == n and batch.sequences[i, :n].tolist() == o.sequences[0, :n].tolist()
    assert int(batch.lengths[1]) == 6
    hf = ar_generate(ar, **encode(tiny_processor, [PROMPTS[3]]), max_new_tokens=12, eos_token_id=stop, engine="hf")
    assert hf.sequences.tolist() == alone[3].sequences.tolist()


def test_static_cache_writes_at_per_row_slots():
    """Prefill writes the prompt into the given rows from slot 0; a step writes each row at its own slots; moving
    rows copies them."""
    cache = StaticKVCache(num_layers=1, rows=3, kv_heads=1, head_dim=3, capacity=8, dtype=torch.float32,
                          device=torch.device("cpu"))
    prompt = torch.randn(1, 1, 3, 3)
    cache.prefill_rows = torch.tensor([2])
    keys, _ = cache.update(prompt, prompt, 0)
    assert torch.equal(keys, prompt) and torch.equal(cache.layers[0].keys[2, :, :3], prompt[0])
    assert not cache.layers[0].keys[:2].any()  # other rows untouched
    cache.prefill_rows = None
    cache.write_index = torch.tensor([[3, 4], [0, 1], [5, 6]])
    step = torch.randn(3, 1, 2, 3)
    keys, _ = cache.update(step, step, 0)
    assert keys.shape == (3, 1, 8, 3)  # static: the whole buffer, same storage every step
    assert keys.data_ptr() == cache.layers[0].keys.data_ptr()
    assert torch.equal(keys[0, :, 3:5], step[0]) and torch.equal(keys[1, :, 0:2], step[1])
    assert torch.equal(keys[2, :, 5:7], step[2]) and torch.equal(keys[2, :, :3], prompt[0])
    before = cache.layers[0].keys[2].clone()
    cache.move_rows(torch.tensor([2]), torch.tensor([0]))
    assert torch.equal(cache.layers[0].keys[0], before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_decoder_layer_equals_the_transformers_layer_bit_for_bit(tiny_bard_model, dtype):
    """generation.layers.decoder_layer_step (the engine's sdpa layer) vs Qwen3VLTextDecoderLayer: the same output
    and the same cache writes, exactly, with a mask that hides some slots of each row; also with the engine's
    stacked weights (q/k/v as one matrix product, the q and k norms as one call)."""
    import copy

    from nemo_bard.generation.layers import decoder_layer_step, sdpa_mask, stack_weights

    text = tiny_bard_model.model.language_model
    cfg = text.config
    layer = copy.deepcopy(text.layers[1]).to(dtype)  # the shared model stays untouched
    layer.self_attn.layer_idx = 0  # a one-layer cache
    rows, q, cap = 2, 5, 12
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, q, cfg.hidden_size, generator=g).to(dtype)
    keep = torch.rand(rows, 1, q, cap, generator=g) > 0.3
    keep[..., 4:9] = True  # every query sees the slots it writes
    pos = torch.tensor([[4, 5, 6, 7, 8], [6, 7, 8, 9, 10]])
    cos, sin = text.rotary_emb(h, pos[None].expand(3, -1, -1))
    caches = [StaticKVCache(1, rows, cfg.num_key_value_heads, cfg.head_dim, cap, dtype, torch.device("cpu"))
              for _ in range(3)]
    prefix = torch.randn(rows, cfg.num_key_value_heads, cap, cfg.head_dim, generator=g).to(dtype)
    for cache in caches:
        cache.layers[0].keys.copy_(prefix)
        cache.layers[0].values.copy_(-prefix)
        cache.write_index = torch.arange(4, 9).expand(rows, -1)
    with torch.no_grad():
        ref = layer(h, attention_mask=keep, position_embeddings=(cos, sin), past_key_values=caches[0])
        lean = decoder_layer_step(layer, h, sdpa_mask(keep, dtype), cos, sin, caches[1].layers[0])
        fused = decoder_layer_step(layer, h, sdpa_mask(keep, dtype), cos, sin, caches[2].layers[0],
                                   stack_weights(layer))
    assert text.config._attn_implementation == "sdpa" and torch.equal(lean, ref) and torch.equal(fused, ref)
    for cache in caches[1:]:
        assert torch.equal(cache.layers[0].keys, caches[0].layers[0].keys)
        assert torch.equal(cache.layers[0].values, caches[0].layers[0].values)


def test_engine_errors_name_the_flag_and_limit(tiny_bard_model, tiny_processor):
    enc = encode(tiny_processor, [PROMPTS[0]])
    with pytest.raises(ValueError, match="--engine 'turbo' is not one of static, compiled, eager"):
        block_diffusion_generate(tiny_bard_model, **enc, max_new_tokens=4, engine="turbo")
    limit = tiny_bard_model.config.text_config.max_position_embeddings
    with pytest.raises(EngineError, match=f"max_position_embeddings {limit}; lower --max-new-tokens"):
        block_diffusion_generate(tiny_bard_model, **enc, max_new_tokens=limit, block_size=4)
    for tau in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"confidence_threshold must be in \[0, 1\]"):
            block_diffusion_generate(tiny_bard_model, **enc, max_new_tokens=4, confidence_threshold=tau)
    # the failed calls released the engine's buffers: the next call runs
    assert block_diffusion_generate(tiny_bard_model, **enc, max_new_tokens=4, block_size=4).lengths.numel() == 1


def test_eager_attention_model_uses_additive_masks(tiny_bard_dir, tiny_bard_model, tiny_processor):
    """A model loaded with eager attention gets additive masks in the engine and decodes the same tokens."""
    from transformers import AutoModelForImageTextToText

    eager_attn = AutoModelForImageTextToText.from_pretrained(tiny_bard_dir, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    enc = encode(tiny_processor, [PROMPTS[1]])
    kw = dict(max_new_tokens=8, block_size=4, eos_token_id=[])
    assert DecodeEngine.for_model(eager_attn).hf_layers
    a = block_diffusion_generate(eager_attn, **enc, **kw)
    b = block_diffusion_generate(tiny_bard_model, **enc, **kw)
    assert torch.equal(a.sequences, b.sequences)


def test_compiled_engine_traces_the_step_and_decodes_the_same_tokens(sharp_model, tiny_processor):
    """engine='compiled' runs the text layers through torch.compile (here with dynamo's eager backend, which
    traces them exactly as inductor would get them but skips code generation, so the test stays fast)."""
    import torch._dynamo

    engine = DecodeEngine.for_model(sharp_model, "compiled")
    engine.compile_backend = "eager"
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    enc = encode(tiny_processor, PROMPTS[:3])
    kw = dict(max_new_tokens=10, block_size=4, denoising_steps=2, confidence_threshold=0.5, eos_token_id=[])
    shapes: set[tuple[int, int]] = set()  # (rows, queries) of the decoding steps
    handle = sharp_model.model.language_model.embed_tokens.register_forward_hook(
        lambda mod, args, out: shapes.add(tuple(out.shape[:2])) if out.shape[1] in (4, 8) else None)
    try:
        compiled = block_diffusion_generate(sharp_model, **enc, engine="compiled", **kw)
    finally:
        handle.remove()
    eager = block_diffusion_generate(sharp_model, **enc, engine="eager", **kw)
    assert torch.equal(compiled.sequences, eager.sequences) and compiled.num_forwards == eager.num_forwards
    # one graph per step shape (rows x the 4-token step or the fused 8-token step), shared by both layers, no breaks
    assert {q for _, q in shapes} == {4, 8} and len(sharp_model.model.language_model.layers) == 2
    assert counts["stats"]["unique_graphs"] == len(shapes)
    assert not counts["graph_break"]


def test_engine_cache_does_not_keep_models_alive(tiny_bard_dir, tiny_processor):
    import gc
    import weakref

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_bard_dir, dtype=torch.float32).eval()
    block_diffusion_generate(model, **encode(tiny_processor, [PROMPTS[0]]), max_new_tokens=4, block_size=4)
    ref = weakref.ref(model)
    assert len(DecodeEngine._engines) >= 1
    del model
    gc.collect()
    assert ref() is None  # engines (buffers, graphs) go with their model


def test_engine_decodes_with_the_current_weights_after_they_change(tiny_bard_dir, tiny_processor):
    """The engine's stacked weights are refreshed per call: after an in-place update of the projections and norms
    (an optimizer step, a checkpoint load through ``.data``) the engine still equals the eager decoder."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_bard_dir, dtype=torch.float32).eval()
    enc = encode(tiny_processor, [PROMPTS[0]])
    kw = dict(max_new_tokens=12, block_size=4, eos_token_id=[])
    before = block_diffusion_generate(model, **enc, engine="static", **kw).sequences
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight.data.copy_(torch.randn(proj.weight.shape, generator=g) * 0.5)
            for norm in (attn.q_norm, attn.k_norm):
                norm.weight.data.copy_(1 + torch.randn(norm.weight.shape, generator=g))
    eager = block_diffusion_generate(model, **enc, engine="eager", **kw).sequences
    static = block_diffusion_generate(model, **enc, engine="static", **kw).sequences
    assert not torch.equal(eager, before)  # the change matters to the output
    assert torch.equal(static, eager)


def test_projections_that_are_not_plain_linears_are_not_stacked(tiny_bard_dir, tiny_processor):
    """A wrapped projection (an adapter, a quantized layer) must run its own forward: the engine keeps the
    unfused path there and still equals the eager decoder."""
    from transformers import AutoModelForImageTextToText

    class Scaled(torch.nn.Linear):  # stands in for an adapter: its forward is not x @ weight.T
        def forward(self, x):
            return 2 * super().forward(x)

    model = AutoModelForImageTextToText.from_pretrained(tiny_bard_dir, dtype=torch.float32).eval()
    attn = model.model.language_model.layers[0].self_attn
    scaled = Scaled(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    scaled.weight = attn.q_proj.weight
    attn.q_proj = scaled
    enc = encode(tiny_processor, [PROMPTS[0]])
    kw = dict(max_new_tokens=12, block_size=4, eos_token_id=[])
    static = block_diffusion_generate(model, **enc, engine="static", **kw).sequences
    assert DecodeEngine.for_model(model)._stacked is None
    assert torch.equal(static, block_diffusion_generate(model, **enc, engine="eager", **kw).sequences)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_prefill_equals_the_transformers_forward_exactly(tiny_bard_model, dtype):
    """The engine's prefill (transformers' embedding + vision merge, then the lean layers) vs transformers' own
    forward on the same static cache: the same final hidden states and the same cached keys/values, exactly, for a
    left-padded batch of a text prompt, an image prompt and an image + video prompt (deepstack features of both)."""
    import copy

    from PIL import Image

    from nemo_bard.attention.masks import dense_mask, prompt_token_meta
    from nemo_bard.generation.session import prompt_positions
    from nemo_bard.generation.inputs import build_inputs, user_conversation

    model = copy.deepcopy(tiny_bard_model).to(dtype)
    processor = pytest.importorskip("transformers").AutoProcessor.from_pretrained(model.name_or_path)
    frames = [Image.new("RGB", (64, 48), (40 * i, 200 - 30 * i, 90)) for i in range(4)]
    chats = [user_conversation("hello there"), user_conversation("Read the digits.", [Image.new("RGB", (64, 64), 7)]),
             user_conversation("What happens?", [Image.new("RGB", (64, 96), (9, 80, 200))], videos=[frames])]
    enc = build_inputs(processor, chats)
    assert enc["pixel_values_videos"] is not None and enc["pixel_values"] is not None
    ids, am = enc["input_ids"], enc["attention_mask"]
    media = {k: v.to(dtype) if v.is_floating_point() else v for k, v in enc.items()
             if k not in ("input_ids", "attention_mask")}
    mask = dense_mask(*prompt_token_meta(am, 4), "block_causal")
    pos, _ = prompt_positions(model, ids, am, media["mm_token_type_ids"], media["image_grid_thw"],
                              media["video_grid_thw"])
    engine = DecodeEngine(model)
    lean, ref = engine.pool(4, 256), engine.pool(4, 320)
    with torch.inference_mode():
        engine.refresh_weights()
        got = engine.prefill(lean, torch.arange(3), ids, mask, pos, media)
        ref.cache.prefill_rows = torch.arange(3)
        want = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=ref.cache,
                           use_cache=True, **media).last_hidden_state
    lp = ids.shape[1]
    assert engine._stacked is not None and torch.equal(got, want)
    for mine, theirs in zip(lean.cache.layers, ref.cache.layers):  # (rows, K/V of the prompt slots)
        assert torch.equal(mine.keys[:, :, :lp], theirs.keys[:, :, :lp])
        assert torch.equal(mine.values[:, :, :lp], theirs.values[:, :, :lp])


def _row_logits(session, model, key) -> list[torch.Tensor]:
    """Drive ``session`` to the end; the block logits of request ``key`` at every step in which it had work."""
    got: list[torch.Tensor] = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: got.append(out.detach().clone()))
    mask_id = model.config.mask_token_id
    steps = []
    try:
        while session.running:
            row = next((i for i, r in enumerate(session.slot) if r is not None and r.key == key), None)
            busy = row is not None and bool((session.x[row, : session.remaining[row]] == mask_id).any())
            got.clear()
            session.step()
            if busy and got:
                steps.append(got[0][row])
    finally:
        handle.remove()
    return steps


@pytest.mark.parametrize("fuse", [True, False])
def test_a_request_joining_a_running_batch_computes_what_it_computes_alone(fuse, sharp_model, tiny_processor):
    """Request A joins a batch already decoding B when B's next forward commits B's first block (A's noisy block
    goes to the slots its solo run uses, its padding half to scratch it must not see), and then runs beside B's
    blocks at its own pace: every step's logits of A equal those of A decoded alone, and so do its tokens."""
    mask_id = sharp_model.config.mask_token_id
    engine = DecodeEngine.for_model(sharp_model)
    # pad 7: an ordinary token (the pad id's embedding is all zeros, which would hide a padding half that leaked)
    kw = dict(rows=2, capacity=192, block_size=4, schedule=[1, 1, 1, 1], mask_token_id=mask_id, stops=[], pad=7,
              strategy=DYNAMIC, threshold=0.5, fuse_commit=fuse)
    a_in = model_inputs(engine.device, **encode(tiny_processor, [PROMPTS[1]]))
    b_in = model_inputs(engine.device, **encode(tiny_processor, [PROMPTS[2]]))
    with torch.inference_mode():
        alone = BlockDiffusionSession(engine, **kw)
        a_alone = RowRequest("A", 14)
        alone.add([a_alone], a_in)
        want = _row_logits(alone, sharp_model, "A")
        alone.close()
        mixed = BlockDiffusionSession(engine, **kw)
        b = RowRequest("B", 30)
        mixed.add([b], b_in)
        while not (b.blocks or mixed.any_pending):  # B's first block ends (fused: its commit waits for a forward)
            mixed.step()
        assert mixed.any_pending == fuse
        a = RowRequest("A", 14)
        mixed.add([a], a_in)
        got = _row_logits(mixed, sharp_model, "A")
        mixed.close()
    assert len(got) == len(want) > 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert a.tokens == a_alone.tokens and len(a.tokens) == 14


def test_a_shared_prefill_gives_the_same_tokens_without_the_prompt_forward(sharp_model, tiny_processor, monkeypatch):
    """Several decoding points of one batch decode from one prompt prefill (eval --tune's first rung): the same
    tokens, lengths and forwards as prefilling for each, and the prompt forward runs once."""
    from nemo_bard.generation import SharedPrefill

    enc = encode(tiny_processor, BATCH8)
    points = [dict(denoising_steps=4, remasking_strategy=STATIC, confidence_threshold=1.0),
              dict(denoising_steps=4, remasking_strategy=DYNAMIC, confidence_threshold=0.5),
              dict(denoising_steps=2, remasking_strategy=DYNAMIC, confidence_threshold=0.2)]
    kw = dict(max_new_tokens=11, block_size=4, eos_token_id=_stops_mid_run(sharp_model, enc, block_size=4,
                                                                          max_new_tokens=11, **points[1]))
    alone = [block_diffusion_generate(sharp_model, **enc, **kw, **p) for p in points]
    engine = DecodeEngine.for_model(sharp_model, "static")
    calls = []
    monkeypatch.setattr(engine, "prefill", lambda *a, _f=engine.prefill: calls.append(1) or _f(*a))
    shared = SharedPrefill()
    together = [block_diffusion_generate(sharp_model, **enc, **kw, **p, engine=engine, shared_prefill=shared)
                for p in points]
    assert len(calls) == 1 and shared.filled and shared.keys[0].shape[0] == len(BATCH8)
    for a, b in zip(alone, together):
        assert torch.equal(a.sequences, b.sequences) and torch.equal(a.lengths, b.lengths)
        assert a.num_forwards == b.num_forwards and torch.equal(a.row_forwards, b.row_forwards)
    assert len({tuple(o.lengths.tolist()) for o in alone}) > 1  # the points really decode differently
    # other prompts (also the same text with other pixels), or another block size (another prompt mask): refused
    other_image = [(text, [(seed + 1, h, w) for seed, h, w in images]) for text, images in BATCH8]
    for other in (encode(tiny_processor, BATCH8[:2]), encode(tiny_processor, other_image)):
        with pytest.raises(EngineError, match="other prompts"):
            block_diffusion_generate(sharp_model, **other, **kw, engine=engine, shared_prefill=shared)
    assert torch.equal(encode(tiny_processor, other_image)["input_ids"], enc["input_ids"])
    with pytest.raises(EngineError, match="block size 4 instead of 8"):
        block_diffusion_generate(sharp_model, **enc, max_new_tokens=11, block_size=8, engine=engine,
                                 shared_prefill=shared)
