"""The one decoding loop: sessions of independent rows on a :class:`~nemo_bard.generation.engine.DecodeEngine`.

A session owns a pool of ``rows`` x ``capacity`` cache slots. Requests (:class:`RowRequest`) are prefilled into
free rows with :meth:`DecodeSession.add` and decoded together, one forward per :meth:`DecodeSession.step`; each
row keeps its own prompt, positions, token budget, confidence threshold, sampling settings and random generator,
so what a row produces does not depend on the other rows. ``block_diffusion_generate`` adds a whole batch and
steps to the end; the server's scheduler keeps one session open and adds requests as they arrive.

Block diffusion (:class:`BlockDiffusionSession`, docs/method.md "Decoding"):

1. A prompt is prefilled with the block-causal mask; its first response block starts as ``B`` mask tokens.
2. Every step denoises the current block of every running row against the committed cache (the block's own K/V
   go to scratch slots) and commits the positions the remasking strategy selects, for at most ``S`` steps; a
   row's block is done once the positions it will return are decided (those before its first decided stop
   token and within its budget).
3. The finished block is committed in the *same* forward as the next block's first step: that forward's input is
   ``[finished block (clean) | next block (noisy)]`` (``fuse_commit``; otherwise a separate forward commits it).
4. A row ends after the block holding a stop token or when its budget is spent; its row is free at once.

Each row moves through its blocks at its own pace: a forward in which some rows commit a finished block has the
fused ``2B`` shape, and a row that does not commit in it (mid-block, or just joined) forwards padding in place of
a finished block, in slots past its committed ones that its noisy queries do not see (the per-row window of
:class:`~nemo_bard.generation.engine.StepBuffers`; a row's cache keeps one block of such scratch). So every row
computes exactly what it would alone, and requests join and leave between any two forwards, without waiting for
the other rows' blocks to end.

AR (:class:`ARSession`): a causal prompt prefill gives the first token, then one token per forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from nemo_bard.attention.masks import dense_mask, prompt_token_meta
from nemo_bard.attention.positions import mrope_positions
from nemo_bard.generation.engine import DecodeEngine, Pool, batch_bucket, device_sync
from nemo_bard.generation.output import GenerationOutput
from nemo_bard.generation.points import EngineError
from nemo_bard.generation.sampling import sample_tokens, select_commits, undecided


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
    pos, _ = mrope_positions(model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, video_grid_thw)
    start = pos.masked_fill(~attention_mask.bool()[None], -1).amax(dim=(0, 2)) + 1
    return pos, start


def cut_after_stop(tokens: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """``tokens`` up to and including the first stop token, and whether there was one."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1], True
    return tokens, False


def pad_rows(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as ``(sequences [b, longest], lengths [b])``, right-padded with ``pad``."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    sequences = torch.full((len(rows), int(lengths.max()) if rows else 0), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        sequences[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return sequences, lengths


@dataclass
class SharedPrefill:
    """One batch's prompt prefill, shared by block-diffusion decoding calls on the same prompts (e.g. several
    decoding points of one block size): the call that finds it empty prefills and fills it; later calls copy its
    keys/values into their cache instead of running the prompt forward, and give the same tokens. ``seconds`` is
    the measured prefill. Not for AR sessions (their prefill also yields the first token)."""

    block_size: int | None = None
    prompts: dict[str, torch.Tensor] = field(default_factory=dict)  # the inputs it was filled from (ids, media)
    start: torch.Tensor | None = None  # [b] each row's first response position
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [b, kv_heads, lp, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def filled(self) -> bool:
        return bool(self.prompts)

    def holds(self, inputs: dict[str, Any], block_size: int) -> bool:
        """Whether it was filled from these very inputs (token ids, mask, pixels) at this block size."""
        given = {k: v for k, v in inputs.items() if v is not None}
        return (block_size == self.block_size and given.keys() == self.prompts.keys()
                and all(torch.equal(v, self.prompts[k]) for k, v in given.items()))


@dataclass
class RowRequest:
    """One sequence to decode and its result (filled in as it runs).

    Args:
        key: the caller's name for it (``collect`` and ``finished`` report it).
        max_new_tokens: response budget.
        threshold: the dynamic strategy's confidence threshold tau (block diffusion; ``None``: the session's).
        temperature, top_k, top_p: sampling (temperature 0 = greedy).
        generator: the random generator of this row's sampling (``None``: the default generator).
    """

    key: Hashable
    max_new_tokens: int
    threshold: float | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)  # committed response tokens (cut after a stop)
    finish_reason: str | None = None  # "stop" (a stop token), "length" (budget), "cancelled"
    forwards: int = 0  # forwards in which this row had work
    blocks: int = 0  # committed blocks (AR: tokens)

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


class DecodeSession:
    """Rows decoded together on one engine pool; see the module docstring.

    Use: :meth:`add` requests (between any two steps), ``while s.running: s.step()``, :meth:`collect` the newly
    committed tokens per request, :meth:`take_finished` the requests that ended; :meth:`close` releases the pool.
    """

    causal_prompt = False  # AR: the prompt is prefilled with a causal mask
    default_threshold = 1.0  # tau of requests that set none (block diffusion: the session's)

    def __init__(self, engine: DecodeEngine, *, rows: int, capacity: int, stops: list[int], pad: int,
                 block_size: int) -> None:
        self.engine, self.pad, self.block_size = engine, pad, block_size
        self.stop_set = set(stops)
        self.stops = torch.tensor(stops, dtype=torch.long, device=engine.device)
        self.pool: Pool = engine.pool(rows, capacity)
        dev = engine.device
        self.slot: list[RowRequest | None] = [None] * rows  # the request each pool row decodes
        self.n = 0  # rows [0, n) take part in forwards (a batch bucket)
        self.active = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.base = torch.zeros(rows, dtype=torch.long, device=dev)  # position of the row's next response token
        self.threshold = torch.ones(rows, 1, device=dev)
        self.row_forwards = torch.zeros(rows, dtype=torch.long, device=dev)
        self.num_forwards = 0  # batched decoding forwards
        self.prefill_time = 0.0
        self._new: list[tuple[Hashable, list[int]]] = []
        self._finished: list[RowRequest] = []
        self._weights_ready = False

    # ------------------------------------------------------------------ rows
    @property
    def running(self) -> int:
        """Rows being decoded."""
        return sum(r is not None for r in self.slot)

    @property
    def free_rows(self) -> int:
        return self.slot.count(None)

    def _row_tensors(self) -> tuple[str, ...]:
        """Per-row device state moved along with a row when the batch is packed."""
        return ("active", "base", "threshold", "row_forwards")

    def add(self, requests: list[RowRequest], inputs: dict[str, Any], shared: SharedPrefill | None = None) -> None:
        """Prefill ``inputs`` (a padded batch, one row per request) into free rows; they decode from the next step.
        With ``shared`` (a :class:`SharedPrefill` of the same prompts), its keys/values are copied in instead of the
        prompt forward, or, when it is empty, this prefill fills it.

        Raises :class:`EngineError` (naming the limit) when a request does not fit the pool; nothing is added then.
        """
        if len(requests) > self.free_rows:
            raise EngineError(f"{len(requests)} requests but {self.free_rows} free rows")
        engine, pool, blen = self.engine, self.pool, self.block_size
        ids, am = inputs["input_ids"], inputs["attention_mask"]
        media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask") and v is not None}
        lp = ids.shape[1]
        reuse = shared is not None and shared.filled
        if shared is not None and self.causal_prompt:
            raise EngineError("a shared prefill serves block-diffusion sessions only")
        if reuse:
            if not shared.holds(inputs, blen):
                raise EngineError(f"this shared prefill holds other prompts, or block size {shared.block_size} "
                                  f"instead of {blen}")
            start = shared.start
        else:
            pos, start = prompt_positions(engine.model, ids, am, media.get("mm_token_type_ids"),
                                          media.get("image_grid_thw"), media.get("video_grid_thw"))
        for req, s in zip(requests, start.tolist()):
            blocks = -(-req.max_new_tokens // blen)
            # slots: the prompt, the response blocks and one block of scratch (the fused step's padding half)
            need = max(lp, s) + (blocks + (blen > 1)) * blen
            if need > pool.capacity:
                raise EngineError(
                    f"prompt ({lp} tokens) + max_tokens ({req.max_new_tokens}) needs {need} cache slots, beyond "
                    f"this session's {pool.capacity}; lower max_tokens or shorten the prompt")
        rows = [i for i, r in enumerate(self.slot) if r is None][: len(requests)]
        rows_t = torch.tensor(rows, device=engine.device)
        t0 = device_sync(engine.device)
        if not self._weights_ready:
            engine.refresh_weights()
            self._weights_ready = True
        if reuse:
            for layer, k, v in zip(pool.cache.layers, shared.keys, shared.values):
                layer.keys[:, :, :lp].index_copy_(0, rows_t, k)
                layer.values[:, :, :lp].index_copy_(0, rows_t, v)
            hidden = None
        else:
            kind, block = prompt_token_meta(am, blen if not self.causal_prompt else 1)
            mask = dense_mask(kind, block, "causal" if self.causal_prompt else "block_causal")
            hidden = engine.prefill(pool, rows_t, ids, mask, pos, media)
            if shared is not None:
                shared.block_size, shared.start = blen, start
                shared.prompts = {k: v for k, v in inputs.items() if v is not None}
                shared.keys = [layer.keys[rows_t, :, :lp] for layer in pool.cache.layers]  # indexing copies
                shared.values = [layer.values[rows_t, :, :lp] for layer in pool.cache.layers]
        pool.key_valid[rows_t] = False
        pool.key_valid[rows_t, :lp] = am.bool()
        pool.write_pos[rows_t] = lp
        for i, req in zip(rows, requests):
            self.slot[i] = req
        self.active[rows_t] = True
        self.base[rows_t] = start
        self.threshold[rows_t, 0] = torch.tensor(
            [self.default_threshold if r.threshold is None else r.threshold for r in requests],
            device=engine.device)
        self.row_forwards[rows_t] = 0
        self.n = max(self.n, batch_bucket(max(rows) + 1))
        self._joined(rows_t, requests, hidden, am)
        elapsed = device_sync(engine.device) - t0
        self.prefill_time += elapsed
        if shared is not None and not reuse:
            shared.seconds = elapsed

    def _joined(self, rows: torch.Tensor, requests: list[RowRequest], hidden: torch.Tensor, am: torch.Tensor) -> None:
        """Kind-specific state of rows that just joined."""

    def cancel(self, key: Hashable) -> RowRequest | None:
        """Stop decoding request ``key``; its row is free at once. Returns it (None: not running)."""
        for i, req in enumerate(self.slot):
            if req is not None and req.key == key:
                self._finish(i, "cancelled")
                self._pack()
                return req
        return None

    def _finish(self, row: int, reason: str) -> None:
        req = self.slot[row]
        req.finish_reason = reason
        req.forwards = int(self.row_forwards[row]) + self._prefill_forwards()
        self.slot[row] = None
        self.active[row] = False
        # a free row inside the batch still runs (masked out): it writes its scratch at slot 0, sees nothing else
        self.pool.write_pos[row] = 0
        self.pool.key_valid[row] = False
        self._finished.append(req)

    def _pack(self) -> None:
        """Move running rows into the lowest rows when that lets forwards use a smaller batch bucket."""
        used = [i for i, r in enumerate(self.slot) if r is not None]
        if not used:
            self.n = 0
            return
        target = batch_bucket(len(used))
        if target >= self.n:
            return
        src = [i for i in used if i >= target]
        dst = [i for i in range(target) if self.slot[i] is None][: len(src)]
        if src:
            self.pool.move_rows(src, dst)
            s = torch.tensor(src, device=self.engine.device)
            d = torch.tensor(dst, device=self.engine.device)
            for name in self._row_tensors():
                t = getattr(self, name)
                t[d] = t[s]
            for a, b in zip(src, dst):
                self.slot[b], self.slot[a] = self.slot[a], None
        self.active[target:] = False
        self.n = target

    def collect(self) -> list[tuple[Hashable, list[int]]]:
        """``[(key, tokens), ...]`` committed since the last call (cut after a stop token and at the budget)."""
        out, self._new = self._new, []
        return out

    def take_finished(self) -> list[RowRequest]:
        """Requests that ended since the last call (their ``finish_reason`` says why)."""
        out, self._finished = self._finished, []
        return out

    def _emit(self, row: int, tokens: list[int], offset: int) -> bool:
        """Record ``tokens`` committed for ``row`` at response ``offset``; finishes the row at a stop or its budget.
        Returns whether the row goes on."""
        req = self.slot[row]
        cut, stopped = cut_after_stop(tokens[: max(req.max_new_tokens - offset, 0)], self.stop_set)
        if cut:
            req.tokens += cut
            self._new.append((req.key, cut))
        req.blocks += 1
        if stopped:
            self._finish(row, "stop")
        elif len(req.tokens) >= req.max_new_tokens:
            self._finish(row, "length")
        return self.slot[row] is not None

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and confidences ``[n, q]`` from ``logits [n, q, V]``, with each row's own sampling settings."""
        n, q, vocab = logits.shape
        tok, conf = sample_tokens(logits.reshape(-1, vocab))  # greedy for all rows at once
        tok, conf = tok.view(n, q), conf.view(n, q)
        for i in range(n):
            req = self.slot[i]
            if req is not None and req.sampled:
                tok[i], conf[i] = sample_tokens(logits[i], req.temperature, req.top_k, req.top_p, req.generator)
        return tok, conf

    def _prefill_forwards(self) -> int:
        return 0

    def close(self) -> None:
        """Release the engine's buffers."""
        self.pool.busy = False

    def step(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class BlockDiffusionSession(DecodeSession):
    """Block-diffusion decoding (module docstring); ``schedule`` is the commits per step of a block (S steps).

    Args:
        engine: the model's engine. rows, capacity: the pool (batch rows, cache slots per row).
        block_size, schedule, mask_token_id, strategy, threshold: the decoding point (``threshold`` is the
            default tau of requests that set none).
        stops, pad: stop token ids; the pad id.
        fuse_commit: commit a finished block in the next block's first forward (False: a separate forward).
        stream_prefix: also return, after every forward, the leading positions of a row's block that are decided
            (a decided position never changes), so a streaming client gets its first tokens before the block
            ends; costs one more host sync per forward. The tokens returned are the same.
    """

    def __init__(self, engine: DecodeEngine, *, rows: int, capacity: int, block_size: int, schedule: list[int],
                 mask_token_id: int, stops: list[int], pad: int, strategy: str, threshold: float,
                 fuse_commit: bool = True, stream_prefix: bool = False) -> None:
        super().__init__(engine, rows=rows, capacity=capacity, stops=stops, pad=pad, block_size=block_size)
        self.schedule, self.mask_id, self.strategy = schedule, mask_token_id, strategy
        self.default_threshold = threshold
        self.fuse, self.stream_prefix = fuse_commit, stream_prefix
        dev = engine.device
        blen = block_size
        self.offsets = torch.arange(block_size, device=dev)
        self.commits = torch.tensor(schedule, dtype=torch.long, device=dev)  # commits at step i of a block
        self.x = torch.full((rows, block_size), pad, dtype=torch.long, device=dev)  # the block being denoised
        self.finished = torch.full((rows, block_size), pad, dtype=torch.long, device=dev)  # awaiting commit
        self.pending = torch.zeros(rows, dtype=torch.bool, device=dev)  # commits `finished` in the next forward
        self.steps = torch.zeros(rows, dtype=torch.long, device=dev)  # steps taken in the current block
        self.remaining = torch.zeros(rows, dtype=torch.long, device=dev)  # budget left at the current block's start
        self.sent = torch.zeros(rows, dtype=torch.long, device=dev)  # leading positions of the block already returned
        self.any_pending = False
        # the fused 2B-token step writes [finished | noisy] at [0, 2B) of every row's write slot; the finished block
        # sees itself, the noisy block both (hi); a row with nothing to commit forwards [padding | noisy] and its
        # noisy queries see only their own block (lo = B)
        idx = torch.arange(2 * blen, device=dev)
        self._fused_hi = torch.where(idx < blen, blen, 2 * blen)
        self._fused_lo = (torch.zeros_like(idx), torch.where(idx < blen, 0, blen))  # (committing, other)

    def _row_tensors(self) -> tuple[str, ...]:
        return (*super()._row_tensors(), "x", "finished", "pending", "steps", "remaining", "sent")

    def _finish(self, row: int, reason: str) -> None:
        super()._finish(row, reason)
        self.x[row] = self.pad  # a free row has nothing to denoise and nothing to commit
        self.pending[row] = False
        self.sent[row] = 0

    def _joined(self, rows, requests, hidden, am) -> None:
        self.x[rows] = self.mask_id
        self.pending[rows] = False
        self.steps[rows] = 0
        self.sent[rows] = 0
        self.remaining[rows] = torch.tensor([r.max_new_tokens for r in requests], device=self.engine.device)

    def _work(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked, work)`` ``[n, B]``: undecided positions of running rows, and those a row will return."""
        n = self.n
        masked = undecided(self.x[:n], self.mask_id, self.stops) & self.active[:n, None]
        # positions past the budget are never returned: once the others are decided, the block is done
        return masked, masked & (self.offsets < self.remaining[:n, None])

    @torch.inference_mode()
    def step(self) -> None:
        """One denoising forward of every running row's block; the rows whose block it completes record it at once
        (and finish, or commit the block in the next forward)."""
        if self.n == 0:
            return
        masked, work = self._work()
        n, blen, pool = self.n, self.block_size, self.pool
        x = self.x[:n]
        base = self.base[:n, None]
        if self.any_pending:  # fused: [finished block (clean) | this block (noisy)]; padding for rows not committing
            q = 2 * blen
            buf = pool.buffers(q, blen).rows(n)
            pend = self.pending[:n, None]
            buf.ids[:, :blen].copy_(torch.where(pend, self.finished[:n], self.pad))
            buf.ids[:, blen:].copy_(x)
            buf.pos[:, :blen].copy_((base - blen).clamp(min=0) + self.offsets)
            buf.pos[:, blen:].copy_(base + self.offsets)
            buf.hi.copy_(self._fused_hi.expand(n, -1))
            buf.lo.copy_(torch.where(pend, *self._fused_lo))
            logits = self.engine.run_step(pool, n, q, blen)
            self._commit(self.pending[:n])
            self.pending.zero_()
            self.any_pending = False
        else:
            buf = pool.buffers(blen, blen).rows(n)
            buf.ids.copy_(x)
            buf.pos.copy_(base + self.offsets)
            logits = self.engine.run_step(pool, n, blen, blen)
        logits[..., self.mask_id] = float("-inf")  # never produce the mask token
        tok, conf = self._sample(logits)
        confidence = torch.where(masked, conf, float("-inf"))
        n_commit = self.commits[self.steps[:n].clamp(max=len(self.schedule) - 1)][:, None]
        commit = select_commits(confidence, masked, n_commit, self.strategy, self.threshold[:n])
        self.x[:n] = torch.where(commit, tok, x)
        self.row_forwards[:n] += work.any(-1)
        self.steps[:n] += self.active[:n]
        self.num_forwards += 1
        _, work = self._work()
        done = self.active[:n] & (~work.any(-1) | (self.steps[:n] >= len(self.schedule)))
        if self.stream_prefix:
            self._send_prefixes(done)
        if bool(done.any()):  # the one host sync of a step
            self._end_blocks(done)

    def _send_prefixes(self, done: torch.Tensor) -> None:
        """Return the newly decided leading positions of the blocks that go on (the others end in this step). A
        prefix holds no stop token and stays within the budget: either would have ended the block."""
        n, blen = self.n, self.block_size
        decided = (self.x[:n] != self.mask_id).long().cumprod(-1).sum(-1)
        grow = self.active[:n] & ~done & (decided > self.sent[:n])
        rows = grow.nonzero()[:, 0].tolist()
        if not rows:
            return
        for i, a, b, t in zip(rows, self.sent[rows].tolist(), decided[rows].tolist(), self.x[rows].tolist()):
            req = self.slot[i]
            req.tokens += t[a:b]
            self._new.append((req.key, t[a:b]))
        self.sent[rows] = decided[rows]

    def _commit(self, rows: torch.Tensor) -> None:
        """Make the ``B`` slots at the write position of ``rows`` visible and move those rows past them."""
        n, blen, pool = self.n, self.block_size, self.pool
        wp = pool.write_pos[:n, None]
        pool.key_valid[:n] |= rows[:, None] & (pool.slots >= wp) & (pool.slots < wp + blen)
        pool.write_pos[:n] += blen * rows

    def _end_blocks(self, done: torch.Tensor) -> None:
        """Record the blocks of the ``done`` rows; finish rows at a stop or their budget; the others commit the
        block (in the next forward when fused) and start their next one."""
        n, blen = self.n, self.block_size
        rows = done.nonzero()[:, 0].tolist()
        tokens, sent = self.x[rows].tolist(), self.sent[rows].tolist()
        going = [i for i, t, s in zip(rows, tokens, sent) if self._emit(i, t[s:], self.slot[i].blocks * blen + s)]
        if going:
            g = torch.tensor(going, device=self.engine.device)
            if self.fuse:
                self.finished[g] = self.x[g]
                self.pending[g] = True
                self.any_pending = True
            else:  # a separate forward commits the finished blocks (the other rows forward their block unchanged)
                cont = torch.zeros(n, dtype=torch.bool, device=self.engine.device)
                cont[g] = True
                buf = self.pool.buffers(blen, 0).rows(n)
                buf.ids.copy_(self.x[:n])
                buf.pos.copy_(self.base[:n, None] + self.offsets)
                self.engine.run_step(self.pool, n, blen, 0)
                self._commit(cont)
                self.row_forwards[:n] += cont
                self.num_forwards += 1
            self.base[g] += blen
            self.remaining[g] -= blen
            self.x[g] = self.mask_id
            self.steps[g] = 0
            self.sent[g] = 0
        self._pack()


class ARSession(DecodeSession):
    """Autoregressive decoding: causal prompt prefill (which gives the first token), then one token per forward."""

    causal_prompt = True

    def __init__(self, engine: DecodeEngine, *, rows: int, capacity: int, stops: list[int], pad: int) -> None:
        super().__init__(engine, rows=rows, capacity=capacity, stops=stops, pad=pad, block_size=1)
        self.token = torch.full((rows,), pad, dtype=torch.long, device=engine.device)  # last token of each row

    def _row_tensors(self) -> tuple[str, ...]:
        return (*super()._row_tensors(), "token")

    def _joined(self, rows, requests, hidden, am) -> None:
        last = am.shape[1] - 1 - am.flip(-1).long().argmax(-1)  # each row's last real prompt token
        logits = self.engine.lm_head(hidden[torch.arange(len(requests), device=am.device), last])
        self.token[rows] = self._sample_rows(logits[:, None], rows.tolist())[:, 0]
        self._emit_tokens(rows.tolist())

    def _sample_rows(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Next tokens ``[len(rows), 1]`` from ``logits [len(rows), 1, V]`` with the rows' sampling settings."""
        tok = logits.argmax(-1)
        for j, i in enumerate(rows):
            req = self.slot[i]
            if req is not None and req.sampled:
                tok[j] = sample_tokens(logits[j], req.temperature, req.top_k, req.top_p, req.generator)[0]
        return tok

    def _emit_tokens(self, rows: list[int]) -> None:
        tokens = self.token[rows].tolist()
        for i, t in zip(rows, tokens):
            self._emit(i, [t], self.slot[i].blocks)
        self._pack()

    def _prefill_forwards(self) -> int:
        return 1  # the prompt forward produces the first token

    @torch.inference_mode()
    def step(self) -> None:
        """Forward the last token of every running row and pick the next one."""
        n, pool = self.n, self.pool
        if n == 0:
            return
        buf = pool.buffers(1, 1).rows(n)
        buf.ids[:, 0].copy_(self.token[:n])
        buf.pos[:, 0].copy_(self.base[:n])
        logits = self.engine.run_step(pool, n, 1, 1)
        active = self.active[:n]
        wp = pool.write_pos[:n, None]
        pool.key_valid[:n] |= active[:, None] & (pool.slots == wp)
        pool.write_pos[:n] += active
        self.base[:n] += active
        self.row_forwards[:n] += active
        self.num_forwards += 1
        self.token[:n] = self._sample_rows(logits, list(range(n)))[:, 0]
        self._emit_tokens([i for i in range(n) if self.slot[i] is not None])


def run_to_end(session: DecodeSession, requests: list[RowRequest], inputs: dict[str, Any],
               on_tokens: Any = None, shared_prefill: SharedPrefill | None = None) -> GenerationOutput:
    """Add ``requests`` (one per row of ``inputs``; with ``shared_prefill``, see :meth:`DecodeSession.add`), decode
    them to the end, release the session; returns the batch's :class:`GenerationOutput` in request order.
    ``on_tokens(index, tokens)`` gets every commit."""
    index = {r.key: i for i, r in enumerate(requests)}
    t0 = device_sync(session.engine.device)
    try:
        session.add(requests, inputs, shared_prefill)
        while True:
            if on_tokens is not None:
                for key, tokens in session.collect():
                    on_tokens(index[key], tokens)
            if not session.running:
                break
            session.step()
    finally:
        session.close()
    wall = device_sync(session.engine.device) - t0
    sequences, lengths = pad_rows([r.tokens for r in requests], session.pad)
    extra = session._prefill_forwards()
    return GenerationOutput(
        sequences=sequences, lengths=lengths, num_forwards=session.num_forwards + extra,
        row_forwards=torch.tensor([r.forwards for r in requests], dtype=torch.long), wall_time=wall,
        prefill_time=session.prefill_time, decode_forwards=session.num_forwards, engine=session.engine.name,
    )
