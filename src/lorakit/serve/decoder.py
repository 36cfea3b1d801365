"""The static-cache decoder the fast engine runs: a KV cache allocated once, prefill in chunks, and decode steps
replayed from CUDA graphs captured at a few batch sizes.

The cache holds `rows` request rows of `capacity` positions per layer, (rows + 1, kv_heads, capacity, head_dim)
for K and for V; the extra row is scratch, where the padding entries of a graph's batch write. A request keeps its
row from admission to retirement (no compaction, nothing moves), so a decode step names each entry's row.
`cache_bytes` is the memory this takes, computed from the model's shapes before anything is allocated.

Decode: one token per entry; each layer writes the new K/V at the row's own position and attends over that row's
valid positions, the last `window` of them on a sliding-window layer, with the scores soft-capped where the model
caps them (kernels.attention: a Triton flash-decoding kernel on CUDA; on the CPU torch's sdpa with a length and
window mask, transformers' eager maths where the scores are capped). A windowed layer's row still holds every
position (what the window leaves out is never read). On CUDA the step is captured once per (batch bucket, adapter
routing) into a CUDA graph whose inputs (tokens, rows, positions, adapter slots and coefficients) are static
buffers: a step copies its batch into them and replays.
A batch of n entries runs in the smallest bucket >= n, the rest padded with the scratch row. The graphs depend on
the slot bank's layout (adapted layers, slot tensors): a new layer or a rank growth recaptures them.

Prefill: the rows whose next chunk starts at the same position run together, right-padded; a chunk attends to its
row's cached positions before it and causally within itself, within each layer's window, scores soft-capped where
the model caps them (kernels.attention.dense_attention: transformers' attention maths).

The layer maths is the model's own modules as its description (lorakit.arch) names them, as in forward.py: norms
(sandwich norms and q/k norms where the family has them), rotary tables per layer (partial, per-layer-type, longrope
row by row and then without graphs), projections whose LoraLinear routing adds each row's adapters (a fused qkv or
gate_up split after it), MLP, soft-capped logits; per-layer windows and the attention soft-cap (arch.windows,
arch.attn_softcap); so greedy tokens in fp32 match offline generation.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from lorakit import arch, faults
from lorakit.kernels.attention import causal_mask, decode_attention, dense_attention
from lorakit.serve.slots import SlotBank

log = logging.getLogger("lorakit.serve")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def cache_bytes(config, rows: int, capacity: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for `rows` rows (plus the scratch row) of `capacity` positions."""
    per = config.num_key_value_heads * arch.head_dim(config) * torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * (rows + 1) * capacity * per


class StaticCache:
    def __init__(self, model: nn.Module, rows: int, capacity: int):
        cfg = model.config
        w = next(model.parameters())
        self.rows, self.capacity, self.scratch = rows, capacity, rows
        shape = (rows + 1, cfg.num_key_value_heads, capacity, arch.head_dim(cfg))
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.num_hidden_layers)]
        self.free = list(range(rows - 1, -1, -1))  # row ids, popped from the end: 0 first

    def take(self) -> int:
        return self.free.pop()

    def give(self, row: int) -> None:
        self.free.append(row)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Decoder:
    def __init__(self, model: nn.Module, bank: SlotBank, rows: int, capacity: int, graphs: bool | None = None):
        self.model, self.bank, self.fam = model, bank, arch.family(model, "the static engine")
        self.parts = [arch.layer_parts(layer) for layer in arch.decoder_layers(model)]
        self.parts = self.parts[:model.config.num_hidden_layers]
        self.windows = arch.windows(model)  # per layer: a query at p sees keys p - window + 1 .. p, or None
        self.softcap = arch.attn_softcap(model)  # attention scores c * tanh(scores / c), or None
        self.sizes = arch.qkv_sizes(model.config)
        # RoPE whose tables depend on a row's length runs row by row (arch.rotary), which a graph cannot replay
        self.row_rope = arch.rope_type(model) in arch.LENGTH_DEPENDENT_ROPE
        self.cache = StaticCache(model, rows, capacity)
        self.device = self.cache.k[0].device
        self.graphs = (self.device.type == "cuda" if graphs is None else graphs) and not self.row_rope
        self.buckets = [b for b in BUCKETS if b < rows] + [rows]
        n, dev = self.buckets[-1], self.device
        # a step's inputs, one buffer (one copy a step): tokens, cache rows, positions
        self._io = torch.zeros(3, n, dtype=torch.long, device=dev)
        self._tok, self._rows, self._pos = self._io[0], self._io[1], self._io[2]
        self._rows.fill_(self.cache.scratch)
        self._routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # k -> idx, coef buffers (n, k)
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._layout = None
        self._pool = None
        self.captures = 0
        self.capture_failures = 0  # captures that raised: their (bucket, k) runs eagerly from then on
        self.uncapturable: set[tuple[int, int]] = set()
        self.compile_failures = 0  # compiled-step captures that raised (the plain step is captured after one)
        # experimental, off by default: LORAKIT_DECODE_COMPILE=1 has torch.compile fuse a decode step's small kernels
        # (norms, rotary, residuals) before its graphs are captured; measured in bench/gpu_serve.py, not yet trusted
        # the adapters of projections sharing an input in one kernel pair (kernels.lora_add_group); LORAKIT_GROUPED=0:
        # two launches per projection, as before (kept to compare in bench/gpu_serve.py). In the compiled step they
        # go through a custom op, opaque to Inductor, which failed on the kernels' own call
        # (bench/results/gpu_engine_log_h200_2026-12-06.txt); should the compiled step still fail to capture, the
        # plain step is captured instead (_try_graph)
        self.grouped = os.environ.get("LORAKIT_GROUPED", "1") != "0"
        self._body = self._decode_body
        if self.graphs and os.environ.get("LORAKIT_DECODE_COMPILE") == "1":
            self._body = torch.compile(self._decode_body, dynamic=True)

    # ---------------------------------------------------------------- the layers
    def _run(self, ids: torch.Tensor, pos: torch.Tensor, attend, lengths: list[int] | None = None,
             seq_lens: list[int] | None = None) -> torch.Tensor:
        """Embeddings, every layer (attend(i, attn, q, k, v) -> (b, heads, s, d) writes the cache and attends),
        final norm. ids, pos (b, s) -> hidden (b, s, hidden). lengths, seq_lens: where the RoPE tables depend on
        a sequence's length, each row's real tokens and the length its tables are chosen by (arch.rotary)."""
        m, fam, P = self.model, self.fam, self.bank.project  # P: each projection with the batch's adapters
        G = self.bank.project_group if self.grouped else None  # q/k/v, gate/up: one kernel pair each
        h = arch.embed(m)(ids)
        tables = arch.rotary(m, h, pos, lengths, seq_lens)  # per layer (cos, sin)
        b, s, _ = h.shape
        for i, p in enumerate(self.parts):
            q, k, v = arch.project_qkv(fam, p.attn, p.input_norm(h), self.sizes, P, G)  # (b, s, heads, d)
            if p.q_norm is not None:
                q, k = p.q_norm(q), p.k_norm(k)
            q, k = arch.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), *tables[i])
            o = attend(i, p.attn, q, k, v.transpose(1, 2))
            o = P(p.attn.o_proj, o.transpose(1, 2).reshape(b, s, -1))
            h = h + (o if p.post_attn is None else p.post_attn(o))
            o = arch.project_mlp(fam, p.mlp, p.pre_mlp(h), P, G)
            h = h + (o if p.post_mlp is None else p.post_mlp(o))
        return arch.final_norm(m)(h)

    # ---------------------------------------------------------------- prefill (eager)
    @torch.no_grad()
    def prefill(self, rows: list[int], chunks: list[list[int]], start: int,
                totals: list[int] | None = None) -> torch.Tensor:
        """Run chunk i of tokens into cache row rows[i] at positions start.. (every row has its first `start`
        positions cached). totals: each row's whole prompt length, which RoPE tables that depend on a sequence's
        length are chosen by. The caller has set the slot bank's batch. -> logits (n, vocab) at each chunk's last
        token."""
        n, width, dev = len(chunks), max(len(c) for c in chunks), self.device
        if start + width > self.cache.capacity:
            raise ValueError(f"a chunk ending at position {start + width} exceeds the cache's {self.cache.capacity}")
        ids = torch.zeros(n, width, dtype=torch.long)
        for r, c in enumerate(chunks):  # right padding: causal attention never lets a real token see a pad
            ids[r, : len(c)] = torch.tensor(c)
        ids = ids.to(dev)
        pos = torch.arange(start, start + width, device=dev).expand(n, width)
        rows_t = torch.tensor(rows, device=dev)
        end = start + width
        masks: dict[int | None, torch.Tensor] = {}  # window -> (1, 1, width, end) bool, one per call

        def attend(i, attn, q, k, v):
            K, V = self.cache.k[i], self.cache.v[i]
            K[rows_t, :, start:end] = k
            V[rows_t, :, start:end] = v
            window = self.windows[i] if self.windows[i] is not None and self.windows[i] < end else None  # binds?
            if not start and window is None:
                return dense_attention(q, k, v, attn.scaling, causal=width > 1, softcap=self.softcap)
            if window not in masks:
                masks[window] = causal_mask(pos[:1], end, window)
            k_all, v_all = (k, v) if not start else (K[rows_t, :, :end], V[rows_t, :, :end])
            return dense_attention(q, k_all, v_all, attn.scaling, masks[window], softcap=self.softcap)

        h = self._run(ids, pos, attend, [len(c) for c in chunks] if self.row_rope else None, totals)
        last = torch.tensor([len(c) - 1 for c in chunks], device=dev)
        return arch.logits(self.model, h[torch.arange(n, device=dev), last][:, None, :])[:, 0].float()

    # ---------------------------------------------------------------- decode
    def _decode_body(self, n: int) -> torch.Tensor:
        tok, rows, pos = self._tok[:n], self._rows[:n], self._pos[:n]
        lengths = pos + 1

        def attend(i, attn, q, k, v):
            K, V = self.cache.k[i], self.cache.v[i]
            K[rows, :, pos] = k[:, :, 0]
            V[rows, :, pos] = v[:, :, 0]
            return decode_attention(q[:, :, 0], K, V, rows, lengths, attn.scaling, self.windows[i],
                                    self.softcap)[:, :, None]

        h = self._run(tok[:, None], pos[:, None], attend, [1] * n if self.row_rope else None)
        return arch.logits(self.model, h)[:, 0].float()

    @torch.no_grad()
    def decode(self, rows: list[int], tokens: list[int], positions: list[int],
               routing: tuple[torch.Tensor, torch.Tensor] | None, eager: bool = False) -> torch.Tensor:
        """One step: token i goes to position positions[i] of cache row rows[i]. routing: (idx (n, k), coef
        (n, k)) from SlotBank.batch, or None for base-only rows. eager: run without a graph (a batch with
        mixture rows, whose routing the caller has set). -> logits (n, vocab)."""
        n = len(rows)
        bucket = next(b for b in self.buckets if b >= n)
        k = 0 if routing is None else routing[0].shape[1]
        pad = bucket - n  # the bucket's padding entries: the scratch row at position 0
        io = torch.tensor([list(tokens) + [0] * pad, list(rows) + [self.cache.scratch] * pad,
                           list(positions) + [0] * pad], dtype=torch.long)
        self._io[:, :bucket].copy_(self._pinned(io), non_blocking=True)
        graph = None
        if self.graphs and not eager and (bucket, k) not in self.uncapturable:
            graph, out = self._try_graph(bucket, k)
        if graph is None:
            if not eager:
                self.bank.bind(None if routing is None else routing[0].to(self.device),
                               None if routing is None else routing[1].to(self.device))
            return self._decode_body(n)  # never the compiled step (compiled for captures only)
        if routing is not None:
            for buf, t in zip(self._buffers(k), routing):  # idx, coef: padding rows slot 0, coefficient 0
                buf[:bucket].copy_(self._pinned(torch.nn.functional.pad(t, (0, 0, 0, pad))), non_blocking=True)
        graph.replay()
        return out[:n]

    def _try_graph(self, bucket: int, k: int):
        """The graph of (bucket, k), captured now if need be; (None, None) where it cannot be captured: that batch
        shape runs eagerly from then on. A compiled step that fails to capture is given up for the plain step
        (every later capture too), which is tried at once."""
        try:
            return self._graph(bucket, k)
        except Exception:  # noqa: BLE001 - a step that cannot be captured runs eagerly, never the capture again
            if self._body != self._decode_body:  # (bound methods: equal, never identical)
                log.exception("the compiled decode step failed to capture (bucket %d, %d adapters a row); the "
                              "plain step is captured from now on", bucket, k)
                self._body = self._decode_body
                self.compile_failures += 1
                self._captured.clear()
                return self._try_graph(bucket, k)
            log.exception("CUDA graph capture failed (bucket %d, %d adapters a row); that batch shape runs "
                          "without a graph from now on", bucket, k)
            self.uncapturable.add((bucket, k))
            self.capture_failures += 1
            return None, None

    def _pinned(self, t: torch.Tensor) -> torch.Tensor:
        """A step's host tensor as its copy to the device reads it: pinned on CUDA, so the copy is queued behind
        the work before it instead of the host waiting for that work (PyTorch keeps the pinned block until the
        copy is done)."""
        on_host = t.device.type == "cpu" and not t.is_pinned()
        return t.pin_memory() if self.device.type == "cuda" and on_host else t

    def _graph(self, bucket: int, k: int):
        layout = self.bank.layout()
        if layout != self._layout:
            self._captured.clear()
            self._layout = layout
        if (bucket, k) not in self._captured:
            self._captured[(bucket, k)] = self._capture(bucket, k)
        return self._captured[(bucket, k)]

    def _buffers(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The static (rows, k) slot and coefficient buffers of stacks of k (contiguous: the kernels copy
        nothing)."""
        if k not in self._routing:
            n = self.buckets[-1]
            self._routing[k] = (torch.zeros(n, k, dtype=torch.long, device=self.device),
                                torch.zeros(n, k, dtype=torch.float32, device=self.device))
        return self._routing[k]

    def _capture(self, bucket: int, k: int):
        """Capture the decode step of `bucket` rows with stacks of k into a graph. Captured in thread-local mode:
        what other threads do meanwhile (the loader, the HTTP handlers) cannot invalidate it. The step buffers
        are restored whether or not the capture succeeds."""
        idx, coef = self._buffers(k) if k else (None, None)
        self.bank.bind(idx[:bucket] if k else None, coef[:bucket] if k else None)
        tok, rows, pos = self._tok.clone(), self._rows.clone(), self._pos.clone()
        self._rows[:bucket].fill_(self.cache.scratch)  # warm-up and capture write the scratch row only
        try:
            faults.point("decoder.capture", bucket)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._body(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._body(bucket)
        finally:
            self._tok.copy_(tok)
            self._rows.copy_(rows)
            self._pos.copy_(pos)
        self.captures += 1
        return graph, out
