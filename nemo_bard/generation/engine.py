"""The static-shape decoding engine: the model-level machinery under every decoding session.

Per-call overhead, not arithmetic, dominates decoding: an eager step rebuilds the attention mask over
the whole cache, goes through the full vision-language forward with its wrappers, and returns views of
a growing cache. The engine removes that work from the hot loop:

* **Static shapes.** A session's rows live in a *pool* of fixed size (batch rows x cache slots). A forward runs
  on the first ``n`` rows, ``n`` a *batch bucket* (1, 2, 4, 8, ...), and has one of a few query shapes:
  ``B`` queries (a block's denoising step), ``2B`` (the fused step that commits the finished block and starts
  the next one), ``1`` (an AR step). Keys are always the whole cache; an explicit mask selects the visible slots.
* **Rows are independent sequences.** Each row has its own write slot (``write_pos[row]``), committed-slot mask
  (``key_valid[row]``), positions and step layout, so a request can be prefilled into a free row and join a
  running batch, and each row moves through its blocks at its own pace (:mod:`nemo_bard.generation.session`).
* **Masks and positions updated in place.** Query ``j`` of row ``r`` writes at slot ``write_pos[r] +
  offset[r, j]`` and sees the committed slots plus the window ``[write_pos[r] + lo[r, j], write_pos[r] +
  hi[r, j])`` (its own block and, in a fused step, the finished one). Ids, positions and this layout are static
  device buffers the session fills, so nothing in a step depends on Python values.
* **Fewer kernels per layer.** With the ``sdpa`` backend the text layers run as
  :func:`~nemo_bard.generation.layers.decoder_layer_step` (the same computation in fewer GPU kernels).
* **CUDA graphs.** On a GPU each (rows, query shape) step is captured once and replayed; the prompt prefill
  stays eager (its text layers are the same lean layers). On CPU the same step function runs eagerly.

Engine names (``--engine``): ``static`` (the above; CUDA graphs on a GPU), ``compiled`` (the same with the text
layers through ``torch.compile``), ``eager`` (the same loop with transformers' own decoder layers and forward, no
graphs, no compilation: the readable baseline the lean layers are checked against). Hugging Face ``generate`` is
``hf`` (AR only, :mod:`nemo_bard.generation.ar`).
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from nemo_bard.attention.masks import additive_mask
from nemo_bard.generation.cache import StaticKVCache
from nemo_bard.generation.layers import (
    StackedWeights,
    decoder_layer_step,
    rms_norm,
    sdpa_mask,
    stack_weights,
    stackable,
)
from nemo_bard.generation.points import EngineError, check_engine
from nemo_bard.integrations.hf import (
    TEXT_DECODER_INPUTS,
    add_deepstack,
    attn_implementation,
    many_recompiles,
    text_decoder_inputs,
)

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


@dataclass
class StepBuffers:
    """The static inputs of a ``q``-token step, ``[rows, q]`` each: token ids, positions, and the layout (write
    offset from the row's write slot, and the window ``[lo, hi)`` each query sees beyond the committed slots);
    ``keep [rows, k]``: the queries whose logits the step returns."""

    ids: torch.Tensor
    pos: torch.Tensor
    offset: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    keep: torch.Tensor

    def rows(self, n: int) -> "StepBuffers":
        """Views of the first ``n`` rows."""
        return StepBuffers(*(t[:n] for t in (self.ids, self.pos, self.offset, self.lo, self.hi, self.keep)))


@dataclass
class Pool:
    """Static buffers of one (rows, capacity): the cache, per-row slot state, step inputs, captured graphs."""

    cache: StaticKVCache
    key_valid: torch.Tensor  # [rows, capacity] bool: committed (visible) slots
    write_pos: torch.Tensor  # [rows] long: each row's first slot after its committed ones
    slots: torch.Tensor  # [capacity] arange
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin tables [capacity, head_dim] (positions < capacity)
    inputs: dict[tuple[int, int], StepBuffers] = field(default_factory=dict)  # by (q, k)
    graphs: dict[tuple, tuple[Any, torch.Tensor | None]] = field(default_factory=dict)
    busy: bool = False  # held by a running session

    @property
    def rows(self) -> int:
        return self.cache.rows

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def buffers(self, q: int, k: int) -> StepBuffers:
        """The static inputs of a ``q``-token step returning the logits of ``k`` queries (default layout: query
        ``j`` writes at offset ``j`` and sees ``[0, q)``; the last ``k`` queries' logits)."""
        if (q, k) not in self.inputs:
            dev = self.key_valid.device
            arange = torch.arange(q, device=dev).expand(self.rows, q)
            zeros = torch.zeros(self.rows, q, dtype=torch.long, device=dev)
            self.inputs[q, k] = StepBuffers(zeros.clone(), zeros.clone(), arange.clone(), zeros.clone(),
                                            torch.full_like(zeros, q), arange[:, q - k:].clone())
        return self.inputs[q, k]

    def move_rows(self, src: list[int], dst: list[int]) -> None:
        """Move the slot state of rows ``src`` to rows ``dst`` (cache included)."""
        s = torch.tensor(src, device=self.key_valid.device)
        d = torch.tensor(dst, device=self.key_valid.device)
        self.cache.move_rows(s, d)
        for t in (self.key_valid, self.write_pos):
            t[d] = t[s]


class DecodeEngine:
    """Static-shape decoding for one model (a ``bard_vl`` model or an AR Qwen3-VL); see the module docstring.

    Args:
        model: the model in eval mode, on its device.
        name: ``static``, ``compiled`` or ``eager`` (see the module docstring).
        cuda_graphs: capture decoding steps as CUDA graphs (default: on for ``static``/``compiled`` on a GPU).
        max_pools: how many (rows, capacity) buffer sets to keep between calls.
    """

    _engines: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, DecodeEngine]]" = weakref.WeakKeyDictionary()
    compile_backend = "inductor"  # torch.compile backend of engine="compiled"

    def __init__(self, model: torch.nn.Module, name: str = "static", cuda_graphs: bool | None = None,
                 max_pools: int = 4) -> None:
        self.name = check_engine(name)
        self._model = weakref.ref(model)  # the per-model cache must not keep the model alive
        self.vlm, self.lm_head = model.model, model.lm_head
        self.compile = name == "compiled"
        self._compiled: Any = None
        self.text = model.model.language_model
        self.cfg = model.config.get_text_config()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        graphs_default = self.device.type == "cuda" and name != "eager"
        self.cuda_graphs = graphs_default if cuda_graphs is None else bool(cuda_graphs)
        self.max_pools = max_pools
        impl = attn_implementation(self.cfg)
        if impl not in ("sdpa", "eager"):
            raise EngineError(
                f"the decoding engine runs the text decoder with sdpa or eager attention, not {impl!r}; load the "
                "model with attn_implementation='sdpa'"
            )
        # transformers' own layers (additive masks) for engine="eager" and for models loaded with eager attention
        self.hf_layers = name == "eager" or impl == "eager"
        if self.compile and self.hf_layers:
            raise EngineError("engine='compiled' compiles the sdpa text layer; load the model with "
                              "attn_implementation='sdpa' (or pass --engine static)")
        self._pools: dict[tuple[int, int], Pool] = {}
        self._stacked: list[StackedWeights] | None = None  # per layer (plain nn.Linear projections, no bias)
        self._graph_pool = None

    @property
    def model(self) -> torch.nn.Module:
        """The model this engine decodes with."""
        model = self._model()
        if model is None:
            raise EngineError("the model of this DecodeEngine was garbage-collected")
        return model

    @classmethod
    def for_model(cls, model: torch.nn.Module, name: str = "static", cuda_graphs: bool | None = None
                  ) -> "DecodeEngine":
        """The engine ``name`` cached for ``model`` (buffers and graphs are reused across calls)."""
        check_engine(name)
        engines = cls._engines.setdefault(model, {})
        param = next(model.parameters())
        key = (name, cuda_graphs)
        engine = engines.get(key)
        if engine is None or engine.device != param.device or engine.dtype != param.dtype:
            engine = engines[key] = cls(model, name, cuda_graphs=cuda_graphs)
        return engine

    # ------------------------------------------------------------------ buffers
    @property
    def max_positions(self) -> int:
        """The model's ``max_position_embeddings`` (0: unknown)."""
        return int(getattr(self.cfg, "max_position_embeddings", 0) or 0)

    def check_positions(self, needed: int) -> None:
        """Refuse ``needed`` positions beyond the model's ``max_position_embeddings`` (naming the flag)."""
        limit = self.max_positions
        if limit and needed > limit:
            raise EngineError(
                f"prompt + --max-new-tokens needs {needed} positions, beyond the model's max_position_embeddings "
                f"{limit}; lower --max-new-tokens"
            )

    def capacity_for(self, slots: int) -> int:
        """Cache slots for ``slots`` tokens, rounded up so buffers and graphs are shared across calls."""
        step = 256 if self.device.type == "cuda" else 64
        return -(-slots // step) * step

    def pool(self, rows: int, capacity: int) -> Pool:
        """Buffers for ``rows`` x ``capacity`` slots, reused when they exist; held until ``pool.busy`` is cleared."""
        key = (rows, capacity)
        pool = self._pools.pop(key, None)
        if pool is not None and pool.busy:
            self._pools[key] = pool
            raise EngineError("a DecodeEngine runs one session at a time per pool size; finish the running one first")
        if pool is None:
            while len(self._pools) >= self.max_pools:
                self._pools.pop(next(iter(self._pools)))
            head_dim = getattr(self.cfg, "head_dim", None) or self.cfg.hidden_size // self.cfg.num_attention_heads
            cache = StaticKVCache(self.cfg.num_hidden_layers, rows, self.cfg.num_key_value_heads, head_dim,
                                  capacity, self.dtype, self.device)
            slots = torch.arange(capacity, device=self.device)
            pool = Pool(cache, torch.zeros(rows, capacity, dtype=torch.bool, device=self.device),
                        torch.zeros(rows, dtype=torch.long, device=self.device), slots, self._rope_table(slots))
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
        if self.hf_layers:
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

    # ---------------------------------------------------------------- forwards
    def prefill(self, pool: Pool, rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                media: dict[str, Any]) -> torch.Tensor:
        """Eager prompt forward (vision tower included) into slots ``[0, L)`` of ``pool``'s ``rows``; returns the
        final hidden states ``[len(rows), L, hidden]``.

        With the lean layers (sdpa) the text layers run as :func:`decoder_layer_step` (the decoding steps' layer,
        the stacked weights included) after transformers' own embedding and vision-language merge
        (:func:`~nemo_bard.integrations.hf.text_decoder_inputs`); the result equals transformers' forward exactly
        on CPU (tested), with fewer kernels and none of its per-call mask and cache bookkeeping.
        """
        cache = pool.cache
        cache.prefill_rows = rows
        try:
            if self.hf_layers:  # transformers' own forward
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
            cache.prefill_rows = None

    def _step_fn(self, pool: Pool, n: int, q: int, k: int) -> torch.Tensor | None:
        """One decoding forward of ``q`` tokens per row on rows ``[0, n)`` (static shapes, no host sync), laid out
        by ``pool.buffers(q, k)`` (see the module docstring); the logits ``[n, k, vocab]`` of its kept queries."""
        buf = pool.buffers(q, k).rows(n)
        ids, pos = buf.ids, buf.pos
        wp = pool.write_pos[:n, None]
        pool.cache.write_index = wp + buf.offset
        lo, hi = (wp + buf.lo)[..., None], (wp + buf.hi)[..., None]
        window = (pool.slots >= lo) & (pool.slots < hi)  # [n, q, capacity]
        mask = pool.key_valid[:n, None, None, :] | window[:, None]
        h = self.text.embed_tokens(ids)
        cos, sin = pool.rope[0][pos], pool.rope[1][pos]
        if self.hf_layers:  # transformers' own decoder layers
            mask = additive_mask(mask, self.dtype)
            for layer in self.text.layers:
                h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=pool.cache)
        else:  # sdpa: the same layer computed with fewer kernels (compiled: one graph serves every layer)
            mask = sdpa_mask(mask, self.dtype)
            step = self._layer_step()
            for layer, cache, w in zip(self.text.layers, pool.cache.layers, self._layer_weights()):
                h = step(layer, h, mask, cos, sin, cache, w)
        if k == 0:
            return None
        h = h.gather(1, buf.keep[..., None].expand(-1, -1, h.shape[-1]))
        return self.lm_head(rms_norm(h, self.text.norm))

    def _layer_step(self) -> Any:
        """:func:`decoder_layer_step`, through ``torch.compile`` for engine="compiled" (the layers share one
        structure, so one compiled graph per step shape serves all of them: compiling costs one layer)."""
        if not self.compile:
            return decoder_layer_step
        if self._compiled is None:
            self._compiled = torch.compile(decoder_layer_step, dynamic=False, backend=self.compile_backend)
        return self._compiled

    def _step(self, pool: Pool, n: int, q: int, k: int) -> torch.Tensor | None:
        if not self.compile:
            return self._step_fn(pool, n, q, k)
        # one graph per (rows, capacity, query shape): allow more than dynamo's default of 8
        with many_recompiles():
            return self._step_fn(pool, n, q, k)

    def run_step(self, pool: Pool, n: int, q: int, k: int) -> torch.Tensor | None:
        """Run a step on rows ``[0, n)`` (replaying its CUDA graph when enabled); inputs and layout are in
        ``pool.buffers(q, k)``. Returns the logits ``[n, k, vocab]`` of the kept queries (None for ``k = 0``)."""
        if not self.cuda_graphs:
            return self._step(pool, n, q, k)
        key = (n, q, k)
        if key not in pool.graphs:
            pool.graphs[key] = self._capture(pool, n, q, k)
        graph, out = pool.graphs[key]
        if graph is None:  # capture failed: same step, run without a graph
            return self._step(pool, n, q, k)
        graph.replay()
        return out

    def _capture(self, pool: Pool, n: int, q: int, k: int):
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: compilation, kernel selection (writes only the step's own slots)
                    self._step(pool, n, q, k)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                out = self._step(pool, n, q, k)
            return graph, out
        except RuntimeError as exc:  # documented fallback: the same static step without a graph
            logger.warning("engine: CUDA graph capture failed for a %d-token step (%s); running it without a graph",
                           q, str(exc).splitlines()[0])
            return None, None
