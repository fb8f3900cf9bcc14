"""The static-shape decoding engine: block diffusion and the AR baseline on the same machinery.

Per-call overhead, not arithmetic, dominates decoding: an eager step rebuilds the attention mask over
the whole cache, goes through the full vision-language forward with its wrappers, and returns views of
a growing cache. The engine removes that work from the hot loop:

* **Static shapes.** A batch is padded to a *batch bucket* (1, 2, 4, 8, ...) and the KV cache
  (:class:`~nemo_bard.generation.cache.StaticKVCache`) has a fixed capacity. Every decoding forward
  has one of a few shapes per bucket: ``B`` queries (a block's denoising step), ``2B`` (the fused
  step that commits the finished block and starts the next one), ``1`` (an AR step). Keys are always
  the whole cache; an explicit mask selects the visible slots.
* **Masks and positions updated in place.** ``key_valid[row, slot]`` marks committed slots (the prompt
  at prefill, a block when it is committed); a step's mask is ``key_valid | window``, where the
  window lets each query see its own (and, for the fused step, the finished) block. Positions and
  write slots come from device tensors, so nothing in a step depends on Python values.
* **Fewer kernels per layer.** With the ``sdpa`` backend the text layers run as
  :func:`~nemo_bard.generation.layers.decoder_layer_step` (the same computation in fewer GPU kernels).
* **CUDA graphs.** On a GPU each (bucket, capacity, query shape) step is captured once and replayed;
  the prompt prefill stays eager (its text layers are the same lean layers). On CPU the same step function runs
  eagerly (no graph).
* **Finished rows are masked out**, not removed; the batch moves to a smaller bucket only when the
  running rows fit in one.
* **At most one host synchronisation per step** (is anything still to do?).

Results equal the eager decoder's (``engine="eager"``, :mod:`nemo_bard.generation.decode`) token for
token in fp32 (tested): the same prefill, mask rule, positions, sampling and commit rules.

Step-level API (for a server): :meth:`DecodeEngine.start_block_diffusion` / :meth:`DecodeEngine.start_ar`
prefill a batch and return a :class:`DecodeSession`; :meth:`DecodeSession.step` runs one forward and
:meth:`DecodeSession.collect` returns the blocks committed since the last call.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from nemo_bard.attention.masks import additive_mask, dense_mask, prompt_token_meta
from nemo_bard.generation.cache import StaticKVCache
from nemo_bard.generation.layers import (
    StackedWeights,
    decoder_layer_step,
    rms_norm,
    sdpa_mask,
    stack_weights,
    stackable,
)
from nemo_bard.generation.output import GenerationOutput
from nemo_bard.generation.points import EngineError, check_engine
from nemo_bard.generation.sampling import sample_tokens, select_commits, undecided
from nemo_bard.integrations.hf import TEXT_DECODER_INPUTS, add_deepstack, attn_implementation, text_decoder_inputs

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_bucket(n: int) -> int:
    """The smallest batch bucket holding ``n`` rows (multiples of the largest bucket beyond it)."""
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    top = BATCH_BUCKETS[-1]
    return -(-n // top) * top


def device_sync(device: torch.device) -> float:
    """Wait for the device, then return ``time.perf_counter()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def prompt_positions(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mm_token_type_ids: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D mRoPE positions ``[3, b, L]`` of (padded) prompts and each row's first response position ``[b]``
    (the largest prompt position + 1, on all three axes). ``model``: any Qwen3-VL (AR or bard_vl)."""
    from nemo_bard.models.modeling_bard_vl import mrope_positions

    pos, _ = mrope_positions(model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, video_grid_thw)
    start = pos.masked_fill(~attention_mask.bool()[None], -1).amax(dim=(0, 2)) + 1
    return pos, start


@dataclass
class _Pool:
    """Static buffers of one (batch bucket, capacity): the cache, the committed-slot mask, inputs, graphs."""

    cache: StaticKVCache
    key_valid: torch.Tensor  # [bucket, capacity] bool: committed (visible) slots
    write_pos: torch.Tensor  # [] long: first slot the next forward writes
    slots: torch.Tensor  # [capacity] arange
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin tables [capacity, head_dim] (positions < capacity)
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # q -> (ids, positions)
    graphs: dict[tuple, tuple[Any, torch.Tensor | None]] = field(default_factory=dict)
    busy: bool = False  # held by a running session

    @property
    def rows(self) -> int:
        return self.cache.rows

    def buffers(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        if q not in self.inputs:
            dev = self.key_valid.device
            self.inputs[q] = (torch.zeros(self.rows, q, dtype=torch.long, device=dev),
                              torch.zeros(self.rows, q, dtype=torch.long, device=dev))
        return self.inputs[q]


class DecodeEngine:
    """Static-shape decoding for one model (a ``bard_vl`` model or an AR Qwen3-VL); see the module docstring.

    Args:
        model: the model in eval mode, on its device.
        compile: run the text layers through ``torch.compile`` (inductor): fewer, fused kernels per forward.
            The first call per step shape compiles one layer (seconds; cached on disk by inductor).
        cuda_graphs: capture decoding steps as CUDA graphs (default: on when the model is on a GPU).
        max_pools: how many (bucket, capacity) buffer sets to keep between calls.
    """

    _engines: "weakref.WeakKeyDictionary[torch.nn.Module, dict[bool, DecodeEngine]]" = weakref.WeakKeyDictionary()
    compile_backend = "inductor"  # torch.compile backend of engine="compiled"

    def __init__(self, model: torch.nn.Module, compile: bool = False, cuda_graphs: bool | None = None,
                 max_pools: int = 4) -> None:
        self._model = weakref.ref(model)  # the per-model cache must not keep the model alive
        self.vlm, self.lm_head = model.model, model.lm_head
        self.compile = bool(compile)
        self._compiled: Any = None
        self.text = model.model.language_model
        self.cfg = model.config.get_text_config()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.max_pools = max_pools
        impl = attn_implementation(self.cfg)
        if impl not in ("sdpa", "eager"):
            raise EngineError(
                f"engine='static' runs the text decoder with sdpa or eager attention, not {impl!r}; load the model "
                "with attn_implementation='sdpa' (or pass --engine eager)"
            )
        self.additive = impl == "eager"
        if self.compile and self.additive:
            raise EngineError("engine='compiled' compiles the sdpa text layer; load the model with "
                              "attn_implementation='sdpa' (or pass --engine static)")
        self._pools: dict[tuple[int, int], _Pool] = {}
        self._stacked: list[StackedWeights] | None = None  # per layer (plain nn.Linear projections, no bias)
        self._hi: dict[tuple[int, ...], torch.Tensor] = {}
        self._graph_pool = None

    @property
    def model(self) -> torch.nn.Module:
        """The model this engine decodes with."""
        model = self._model()
        if model is None:
            raise EngineError("the model of this DecodeEngine was garbage-collected")
        return model

    @classmethod
    def for_model(cls, model: torch.nn.Module, name: str = "static") -> "DecodeEngine":
        """The engine ``name`` (``static`` or ``compiled``) cached for ``model``: buffers and graphs are reused."""
        compiled = check_engine(name) == "compiled"
        if name == "eager":
            raise EngineError("engine='eager' is the reference decoder, not a DecodeEngine")
        engines = cls._engines.setdefault(model, {})
        param = next(model.parameters())
        engine = engines.get(compiled)
        if engine is None or engine.device != param.device or engine.dtype != param.dtype:
            engine = engines[compiled] = cls(model, compile=compiled)
        return engine

    # ------------------------------------------------------------------ buffers
    def capacity_for(self, needed: int) -> int:
        """Cache slots for ``needed`` tokens, rounded up so buffers and graphs are shared across calls."""
        limit = int(getattr(self.cfg, "max_position_embeddings", 0) or 0)
        if limit and needed > limit:
            raise EngineError(
                f"prompt + --max-new-tokens needs {needed} positions, beyond the model's max_position_embeddings "
                f"{limit}; lower --max-new-tokens"
            )
        step = 256 if self.device.type == "cuda" else 64
        cap = -(-needed // step) * step
        return min(cap, limit) if limit else cap

    def pool(self, rows: int, capacity: int) -> _Pool:
        """Buffers for ``rows`` (a bucket) x ``capacity`` slots, reused when they exist."""
        key = (rows, capacity)
        pool = self._pools.pop(key, None)
        if pool is not None and pool.busy:
            self._pools[key] = pool
            raise EngineError("a DecodeEngine runs one session at a time per batch bucket; finish the running one first")
        if pool is None:
            while len(self._pools) >= self.max_pools:
                self._pools.pop(next(iter(self._pools)))
            head_dim = getattr(self.cfg, "head_dim", None) or self.cfg.hidden_size // self.cfg.num_attention_heads
            cache = StaticKVCache(self.cfg.num_hidden_layers, rows, self.cfg.num_key_value_heads, head_dim,
                                  capacity, self.dtype, self.device)
            slots = torch.arange(capacity, device=self.device)
            pool = _Pool(cache, torch.zeros(rows, capacity, dtype=torch.bool, device=self.device),
                         torch.zeros((), dtype=torch.long, device=self.device), slots, self._rope_table(slots))
        self._pools[key] = pool  # most recently used last
        pool.busy = True
        return pool

    def _rope_table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of every text position (equal on the three mRoPE axes), from the model's own rotary module.

        The rotary embedding is elementwise in the position, so a lookup equals computing it per step.
        """
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.text.rotary_emb(probe, positions[None, None].expand(3, 1, -1))
        return cos[0], sin[0]

    def refresh_weights(self) -> None:
        """Stack each layer's q/k/v and q/k norm weights (:func:`stack_weights`), in place once allocated.

        Called when a session starts, so decoding always uses the model's current weights (also after training
        steps or a checkpoint load between calls); the copy is one pass over those weights, and the buffers stay
        where captured graphs read them. Costs their size in extra memory (~0.5 GB for a 2B model in bf16).
        """
        if self.additive:
            return
        layers = list(self.text.layers)
        if not all(stackable(layer) for layer in layers):
            return  # adapters (LoRA), quantized or biased projections: the unstacked path calls each module
        if self._stacked is None:
            self._stacked = [stack_weights(layer) for layer in layers]
        else:
            for layer, out in zip(layers, self._stacked):
                stack_weights(layer, out=out)

    def _layer_weights(self) -> list[StackedWeights | None]:
        """Per text layer: its stacked weights, or None where the layer's own projections run."""
        return self._stacked or [None] * len(self.text.layers)

    def _hi_tensor(self, hi: tuple[int, ...]) -> torch.Tensor:
        if hi not in self._hi:
            self._hi[hi] = torch.tensor(hi, dtype=torch.long, device=self.device)
        return self._hi[hi]

    # ---------------------------------------------------------------- forwards
    def prefill(self, pool: _Pool, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                media: dict[str, Any]) -> torch.Tensor:
        """Eager prompt forward (vision tower included) into the first rows of ``pool``; returns final hidden states.

        With sdpa the text layers run as :func:`decoder_layer_step` (the decoding steps' layer, the stacked
        weights included) after transformers' own embedding and vision-language merge
        (:func:`~nemo_bard.integrations.hf.text_decoder_inputs`); the result equals transformers' forward exactly
        on CPU (tested), with fewer kernels and none of its per-call mask and cache bookkeeping.
        """
        cache = pool.cache
        cache.prefill = True
        try:
            if self.additive:  # eager attention: transformers' own forward
                out = self.vlm(input_ids=ids, attention_mask=additive_mask(mask, self.dtype), position_ids=pos,
                               past_key_values=cache, use_cache=True, **media)
                return out.last_hidden_state
            got = text_decoder_inputs(self.vlm, input_ids=ids, position_ids=pos, **media)
            h, visual, deepstack = (got[k] for k in TEXT_DECODER_INPUTS)
            cos, sin = self.text.rotary_emb(h, pos)
            mask = sdpa_mask(mask, self.dtype)
            for i, (layer, layer_cache, w) in enumerate(zip(self.text.layers, cache.layers, self._layer_weights())):
                h = decoder_layer_step(layer, h, mask, cos, sin, layer_cache, w)
                if deepstack is not None and i < len(deepstack):  # visual features added to the first layers
                    h = add_deepstack(self.text, h, visual, deepstack[i])
            return rms_norm(h, self.text.norm)
        finally:
            cache.prefill = False

    def _step_fn(self, pool: _Pool, q: int, hi: torch.Tensor, logits_from: int | None) -> torch.Tensor | None:
        """One decoding forward of ``q`` tokens at ``pool.write_pos`` (static shapes, no host sync)."""
        ids, pos = pool.buffers(q)
        pool.cache.write_index = pool.write_pos + pool.slots[:q]
        window = (pool.slots >= pool.write_pos) & (pool.slots < pool.write_pos + hi[:, None])  # [q, capacity]
        mask = (pool.key_valid[:, None, None, :] | window)
        h = self.text.embed_tokens(ids)
        cos, sin = pool.rope[0][pos], pool.rope[1][pos]
        if self.additive:  # eager attention: transformers' own layers
            mask = additive_mask(mask, self.dtype)
            for layer in self.text.layers:
                h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=pool.cache)
        else:  # sdpa: the same layer computed with fewer kernels (compiled: one graph serves every layer)
            mask = sdpa_mask(mask, self.dtype)
            step = self._layer_step()
            for layer, cache, w in zip(self.text.layers, pool.cache.layers, self._layer_weights()):
                h = step(layer, h, mask, cos, sin, cache, w)
        if logits_from is None:
            return None
        return self.lm_head(rms_norm(h[:, logits_from:], self.text.norm))

    def _layer_step(self) -> Any:
        """:func:`decoder_layer_step`, through ``torch.compile`` for engine="compiled" (the layers share one
        structure, so one compiled graph per step shape serves all of them: compiling costs one layer)."""
        if not self.compile:
            return decoder_layer_step
        if self._compiled is None:
            self._compiled = torch.compile(decoder_layer_step, dynamic=False, backend=self.compile_backend)
        return self._compiled

    def _step(self, pool: _Pool, q: int, hi: torch.Tensor, logits_from: int | None) -> torch.Tensor | None:
        if not self.compile:
            return self._step_fn(pool, q, hi, logits_from)
        # one graph per (bucket, capacity, query shape): allow more than dynamo's default of 8
        with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1024):
            return self._step_fn(pool, q, hi, logits_from)

    def run_step(self, pool: _Pool, q: int, hi: tuple[int, ...], logits_from: int | None) -> torch.Tensor | None:
        """Run a step (replaying its CUDA graph when enabled); inputs are in ``pool.buffers(q)``."""
        hi_t = self._hi_tensor(hi)
        if not self.cuda_graphs:
            return self._step(pool, q, hi_t, logits_from)
        key = (q, hi, logits_from)
        if key not in pool.graphs:
            pool.graphs[key] = self._capture(pool, q, hi_t, logits_from)
        graph, out = pool.graphs[key]
        if graph is None:  # capture failed: same step, run without a graph
            return self._step(pool, q, hi_t, logits_from)
        graph.replay()
        return out

    def _capture(self, pool: _Pool, q: int, hi: torch.Tensor, logits_from: int | None):
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: compilation, kernel selection (writes only scratch slots)
                    self._step(pool, q, hi, logits_from)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                out = self._step(pool, q, hi, logits_from)
            return graph, out
        except RuntimeError as exc:  # documented fallback: the same static step without a graph
            logger.warning("engine: CUDA graph capture failed for a %d-token step (%s); running it without a graph",
                           q, str(exc).splitlines()[0])
            return None, None

    # ---------------------------------------------------------------- sessions
    def start_block_diffusion(self, inputs: dict[str, Any], *, block_size: int, schedule: list[int],
                              max_new_tokens: int, mask_token_id: int, stops: torch.Tensor, pad: int,
                              strategy: str, threshold: float, temperature: float = 0.0, top_k: int | None = None,
                              top_p: float | None = None, generator: torch.Generator | None = None,
                              fuse_commit: bool = True) -> "BlockDiffusionSession":
        """Prefill a batch and return its block-diffusion session."""
        return BlockDiffusionSession(self, inputs, block_size=block_size, schedule=schedule,
                                     max_new_tokens=max_new_tokens, mask_token_id=mask_token_id, stops=stops, pad=pad,
                                     strategy=strategy, threshold=threshold, temperature=temperature, top_k=top_k,
                                     top_p=top_p, generator=generator, fuse_commit=fuse_commit)

    def start_ar(self, inputs: dict[str, Any], *, max_new_tokens: int, stops: torch.Tensor,
                 pad: int) -> "ARSession":
        """Prefill a batch and return its greedy autoregressive session (one token per forward)."""
        return ARSession(self, inputs, max_new_tokens=max_new_tokens, stops=stops, pad=pad)


class DecodeSession:
    """A batch being decoded by a :class:`DecodeEngine` (prefilled at construction).

    Drive it with ``while not s.done: s.step()``; :meth:`collect` returns ``[(row, tokens), ...]`` committed
    since the last call (eos included, nothing after it); :meth:`result` builds the output.
    """

    kind = "?"

    def __init__(self, engine: DecodeEngine, inputs: dict[str, Any], *, max_new_tokens: int, stops: torch.Tensor,
                 pad: int, block_size: int, causal_prompt: bool) -> None:
        self.engine, self.stops, self.pad, self.max_new_tokens = engine, stops, pad, max_new_tokens
        dev = engine.device
        ids, am = inputs["input_ids"], inputs["attention_mask"]
        media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask") and v is not None}
        self.batch, lp = ids.shape
        self.prompt_len = lp
        self.block_size = block_size
        self.num_blocks = -(-max_new_tokens // block_size)
        t0 = device_sync(dev)
        bucket = batch_bucket(self.batch)
        kind, block = prompt_token_meta(am, block_size)
        mask = dense_mask(kind, block, "causal" if causal_prompt else "block_causal")
        pos, start = prompt_positions(engine.model, ids, am, media.get("mm_token_type_ids"),
                                      media.get("image_grid_thw"), media.get("video_grid_thw"))
        # slots hold the prompt then the response; rotary tables are indexed by position (mRoPE may exceed lp)
        needed = max(lp, int(start.max())) + self.num_blocks * block_size
        self.pool = engine.pool(bucket, engine.capacity_for(needed))
        try:
            engine.refresh_weights()
            self.hidden = engine.prefill(self.pool, ids, mask, pos, media)
        except BaseException:
            self.close()
            raise
        pool = self.pool
        pool.key_valid.zero_()
        pool.key_valid[: self.batch, :lp] = am.bool()
        pool.write_pos.fill_(lp)
        self.length = lp  # committed slots (host copy of write_pos)
        self.start = torch.zeros(bucket, dtype=torch.long, device=dev)
        self.start[: self.batch] = start
        self.orig = torch.full((bucket,), -1, dtype=torch.long, device=dev)  # original row of each bucket row
        self.orig[: self.batch] = torch.arange(self.batch, device=dev)
        self.active = self.orig >= 0
        # one row per original row plus a scratch row (index ``batch``) that padding rows write into
        self.out = torch.full((self.batch + 1, self.num_blocks * block_size), pad, dtype=torch.long, device=dev)
        self.row_forwards = torch.zeros(self.batch + 1, dtype=torch.long, device=dev)  # last entry: pad rows
        self.num_forwards = 0
        self.done = False
        self._new: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []  # (orig, active, tokens, offset)
        self.t0, self.prefill_time = t0, device_sync(dev) - t0
        self._prompt = ids[0, am[0].bool()]

    # ---------------------------------------------------------------- helpers
    def _count_forward(self, working: torch.Tensor) -> None:
        """One batched forward; ``working [bucket]`` marks rows that had work in it."""
        self.num_forwards += 1
        self.row_forwards.index_add_(0, self.orig.where(self.orig >= 0, self.batch), working.long())

    def _commit(self, n: int) -> None:
        """Make ``n`` slots after the committed length visible and advance it."""
        self.pool.key_valid[:, self.length:self.length + n] = True
        self.length += n
        self.pool.write_pos.fill_(self.length)

    def _finish_rows(self, tokens: torch.Tensor, offset: int) -> int:
        """Record ``tokens [bucket, n]`` at ``offset``; deactivate rows that produced a stop. Returns running rows.

        Device-side only (no boolean indexing), except the count of running rows: the one host sync.
        """
        dest = self.orig.where(self.orig >= 0, self.batch)
        cols = slice(offset, offset + tokens.shape[1])
        self.out[dest, cols] = torch.where(self.active[:, None], tokens, self.out[dest, cols])
        self._new.append((self.orig, self.active, tokens, offset))
        self.active = self.active & ~torch.isin(tokens, self.stops).any(-1)
        running = int(self.active.sum())
        if running and running <= self.pool.rows // 2:
            self._compact(running)
        return running

    def _compact(self, running: int) -> None:
        """Move the running rows into the smallest bucket that holds them."""
        bucket = batch_bucket(running)
        if bucket >= self.pool.rows:
            return
        keep = self.active.nonzero()[:, 0]
        old = self.pool
        new = self.engine.pool(bucket, old.cache.capacity)
        new.cache.copy_rows_from(old.cache, keep)
        new.key_valid.zero_()
        new.key_valid[:running] = old.key_valid[keep]
        new.write_pos.fill_(self.length)
        old.busy = False
        self.pool = new
        for name in self._row_state():
            value = getattr(self, name)
            fresh = torch.zeros((bucket, *value.shape[1:]), dtype=value.dtype, device=value.device)
            fresh[:running] = value[keep]
            setattr(self, name, fresh)
        self.orig[running:] = -1
        self.active = self.orig >= 0

    def _row_state(self) -> tuple[str, ...]:
        return ("start", "orig")

    def collect(self) -> list[tuple[int, list[int]]]:
        """Tokens committed since the last call, per original row: cut after a stop token and at the budget."""
        out = []
        stops = set(self.stops.tolist())
        for orig, active, toks, offset in self._new:
            rows = orig[active]
            for row, seq in zip(rows.tolist(), toks[active][:, : max(self.max_new_tokens - offset, 0)].tolist()):
                cut = next((i + 1 for i, t in enumerate(seq) if t in stops), len(seq))
                out.append((row, seq[:cut]))
        self._new = []
        return out

    def close(self) -> None:
        """Release the engine's buffers (done by :meth:`result`; call it when abandoning a session)."""
        self.pool.busy = False

    def result(self) -> GenerationOutput:
        """The finished batch as a :class:`GenerationOutput` (ordinary tensors, usable outside inference mode)."""
        from nemo_bard.generation.decode import finalize

        self.close()
        sequences, lengths = finalize(self.out[: self.batch, : self.max_new_tokens].clone(), self.stops.clone(),
                                      self.pad)
        wall = device_sync(self.engine.device) - self.t0
        return GenerationOutput(
            sequences=sequences, lengths=lengths, num_forwards=self.num_forwards + self._prefill_forwards(),
            row_forwards=self._row_forward_counts(lengths), wall_time=wall, prefill_time=self.prefill_time,
            decode_forwards=self.num_forwards, engine="static",
        )

    def _prefill_forwards(self) -> int:
        return 0

    def _row_forward_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.row_forwards[: self.batch].clone()  # clone: an ordinary tensor

    def step(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class BlockDiffusionSession(DecodeSession):
    """Block-diffusion decoding of one batch (same rules as :func:`~nemo_bard.generation.decode.block_diffusion_generate`)."""

    kind = "block_diffusion"

    @torch.inference_mode()
    def __init__(self, engine: DecodeEngine, inputs: dict[str, Any], *, block_size: int, schedule: list[int],
                 max_new_tokens: int, mask_token_id: int, stops: torch.Tensor, pad: int, strategy: str,
                 threshold: float, temperature: float, top_k: int | None, top_p: float | None,
                 generator: torch.Generator | None, fuse_commit: bool) -> None:
        super().__init__(engine, inputs, max_new_tokens=max_new_tokens, stops=stops, pad=pad, block_size=block_size,
                         causal_prompt=False)
        self.schedule, self.mask_id, self.strategy, self.threshold = schedule, mask_token_id, strategy, threshold
        self.sampling = (temperature, top_k, top_p, generator)
        self.fuse = fuse_commit
        self.offsets = torch.arange(block_size, device=engine.device)
        self.pending = False  # a finished block waits to be committed by the next forward
        self.block, self.step_in_block = 0, 0
        self.hidden = None  # prefill hidden states are not needed here
        self._new_block()

    def _row_state(self) -> tuple[str, ...]:
        return ("start", "orig", "x")

    def _new_block(self) -> None:
        rows = self.pool.rows
        if self.pending:
            self.finished = self.x
        self.x = torch.full((rows, self.block_size), self.mask_id, dtype=torch.long, device=self.engine.device)
        self.x.masked_fill_(~self.active[:, None], self.pad)  # rows that stopped have nothing to denoise
        self.step_in_block = 0

    @torch.inference_mode()
    def step(self) -> None:
        """One denoising forward of the current block (the first one also commits the previous block)."""
        block_len, x = self.block_size, self.x
        masked = undecided(x, self.mask_id, self.stops)
        if self.step_in_block >= len(self.schedule) or not bool(masked.any()):  # block finished: sync per step
            self._end_block()
            return
        pool = self.pool
        pos0 = self.start[:, None] + self.block * block_len + self.offsets
        if self.pending:  # fused: [finished block (clean) | this block (noisy)]
            q, hi = 2 * block_len, (block_len,) * block_len + (2 * block_len,) * block_len
            ids, pos = pool.buffers(q)
            ids[:, :block_len].copy_(self.finished)
            ids[:, block_len:].copy_(x)
            pos[:, :block_len].copy_(pos0 - block_len)
            pos[:, block_len:].copy_(pos0)
        else:
            q, hi = block_len, (block_len,) * block_len
            ids, pos = pool.buffers(q)
            ids.copy_(x)
            pos.copy_(pos0)
        logits = self.engine.run_step(pool, q, hi, q - block_len)
        if self.pending:
            self._commit(block_len)
            self.pending = False
        logits[..., self.mask_id] = float("-inf")  # never produce the mask token
        temperature, top_k, top_p, gen = self.sampling
        tok, conf = sample_tokens(logits.reshape(-1, logits.shape[-1]), temperature, top_k, top_p, gen)
        confidence = torch.where(masked, conf.view_as(x), float("-inf"))
        commit = select_commits(confidence, masked, self.schedule[self.step_in_block], self.strategy,
                                self.threshold)
        self.x = torch.where(commit, tok.view_as(x), x)
        self._count_forward(masked.any(-1))
        self.step_in_block += 1

    def _end_block(self) -> None:
        k, block_len = self.block, self.block_size
        running = self._finish_rows(self.x, k * block_len)
        self.block += 1
        if running == 0 or self.block == self.num_blocks:
            self.done = True
            return
        if self.fuse:
            self.pending = True
        else:  # a separate forward commits the finished block
            pool = self.pool
            ids, pos = pool.buffers(block_len)
            ids.copy_(self.x)
            pos.copy_(self.start[:, None] + k * block_len + self.offsets)
            self.engine.run_step(pool, block_len, (block_len,) * block_len, None)
            self._commit(block_len)
            self._count_forward(self.active)
        self._new_block()


class ARSession(DecodeSession):
    """Greedy autoregressive decoding of one batch: causal prompt prefill, then one-token steps."""

    kind = "ar"

    @torch.inference_mode()
    def __init__(self, engine: DecodeEngine, inputs: dict[str, Any], *, max_new_tokens: int, stops: torch.Tensor,
                 pad: int) -> None:
        super().__init__(engine, inputs, max_new_tokens=max_new_tokens, stops=stops, pad=pad, block_size=1,
                         causal_prompt=True)
        am = inputs["attention_mask"]
        last = am.shape[1] - 1 - am.flip(-1).long().argmax(-1)  # each row's last real prompt token
        logits = engine.lm_head(self.hidden[torch.arange(self.batch, device=am.device), last])
        self.hidden = None
        self.token = torch.full((self.pool.rows,), pad, dtype=torch.long, device=engine.device)
        self.token[: self.batch] = logits.argmax(-1)
        self.t = 0
        self._after_token()

    def _row_state(self) -> tuple[str, ...]:
        return ("start", "orig", "token")

    def _after_token(self) -> None:
        running = self._finish_rows(self.token[:, None], self.t)
        self.t += 1
        if running == 0 or self.t == self.max_new_tokens:
            self.done = True

    @torch.inference_mode()
    def step(self) -> None:
        """Forward the last token of every row and pick the next one."""
        pool = self.pool
        ids, pos = pool.buffers(1)
        ids[:, 0].copy_(self.token)
        pos[:, 0].copy_(self.start + self.t - 1)
        logits = self.engine.run_step(pool, 1, (1,), 0)
        self._commit(1)
        self._count_forward(self.active)
        self.token = logits[:, 0].argmax(-1)
        self._after_token()

    def _prefill_forwards(self) -> int:
        return 1  # the prompt forward produces the first token

    def _row_forward_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths.clone()  # one forward per token, the prefill's included
