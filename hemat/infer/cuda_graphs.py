"""The decode step at static shapes, recorded as CUDA graphs.

At batch 1 a decode step of a small model is bound by kernel launches (hundreds per token), not by
memory traffic; a CUDA graph replays them all with one launch. A graph fixes every shape and address,
so the step is padded to buckets: the batch to 1, 2, 4, 8, ... (up to max_batch_size) and the attended
span to 256 · 2^k tokens (whole pages, up to the context). Padding rows write and read the cache's
scratch page 0 and are never read back. Everything a step needs from the host (token ids, positions,
block tables) travels in one int64 tensor [rows, W + 2] = [block table | position | token id], copied into
the bucket's static input from pinned memory; the cache's write/read slots and mask are computed on the
device inside the graph (PagedCache.set_step). The hidden states and logits come back in the bucket's static outputs.

Left on the host per token: that one input copy (asynchronous) and the read of the sampled token ids
(the scheduler needs them for stop checks and streaming), which is the step's one synchronisation.

A bucket is captured after CAPTURE_AFTER eager uses, so shapes a run rarely meets cost no capture; with
capture=False (CPU, or `Engine(cuda_graphs="eager")`) the same bucketed step runs eagerly, which is how
the CPU tests check it against the plain decode, or, with compile=True, compiled by torch.compile per
bucket (compiled_decode.py). Graphs read the weights by address: when the
parameters change (an optimizer step, a load) every graph is dropped and recaptured on later use."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from hemat.infer.cache import PagedCache
from hemat.infer.compiled_decode import Buckets, CompiledSteps


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: torch.Tensor  # static device input [rows, W + 2]
    staging: torch.Tensor  # pinned host copy of the next step's inputs
    copied: "torch.cuda.Event"  # the last copy out of staging finished
    outputs: tuple[torch.Tensor, torch.Tensor]  # static device outputs: hidden [rows, H], logits [rows, vocab]


class BucketedDecode:
    CAPTURE_AFTER = 2  # eager uses of a bucket before it is recorded

    def __init__(self, model, cache: PagedCache, max_batch_size: int, max_context: int, capture: bool,
                 compile: bool = False):
        self.model, self.cache = model, cache
        self.capture = capture  # False: eager, or compiled where `compile` (CPU: compiled_decode.py)
        self.bucket = Buckets(max_batch_size, max_context, cache.page_size)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.uses: dict[tuple[int, int], int] = {}
        self.pool = None
        self.tensors = [*model.parameters(), *model.buffers()]
        self.weights_key = self._weights_key()
        self.enabled = True  # False after a failed capture: the engine then takes its plain decode path
        self.compiled = None
        if compile:
            self.compiled = CompiledSteps(self.forward, self.example, cache, len(self.bucket))
            self.compiled.queue(self.bucket(1, 1))  # the first request's bucket, compiled at start-up

    def example(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        """A bucket's all-padding inputs (position 0 of the scratch page) and its width."""
        batch, width = key
        return torch.zeros(batch, width + 2, dtype=torch.long, device=self.cache.device), width

    def __call__(self, token_ids: list[int], block_tables: list[list[int]], positions: list[int]):
        """One decode step: row i feeds token_ids[i] at positions[i] through its block table → (the final
        hidden states [rows, H] (MTP drafts read them), logits [rows, vocab]); on CUDA views of the graph's
        outputs, valid until the next step."""
        n = len(token_ids)
        batch, width = self.bucket(n, max(positions) + 1)
        rows = [list(t[:width]) + [0] * (width - len(t[:width])) + [p, tok]
                for t, p, tok in zip(block_tables, positions, token_ids)]
        rows += [[0] * (width + 2)] * (batch - n)  # padding: position 0 of the scratch page
        inputs = torch.tensor(rows, dtype=torch.long)
        graph = self._graph((batch, width)) if self.capture else None
        if graph is None:
            compiled = self.compiled.get((batch, width)) if self.compiled is not None else None
            hidden, logits = (compiled or self.forward)(inputs.to(self.cache.device), width)
            return hidden[:n], logits[:n]
        graph.copied.synchronize()  # the previous step's copy has left the staging buffer
        graph.staging.copy_(inputs)
        with torch.cuda.device(self.cache.device):
            graph.inputs.copy_(graph.staging, non_blocking=True)
            graph.copied.record()
            graph.graph.replay()
        return tuple(out[:n] for out in graph.outputs)

    def forward(self, inputs: torch.Tensor, width: int, cache: PagedCache | None = None):
        """The step itself, on static shapes: inputs [rows, W + 2] → (hidden [rows, H], logits [rows, vocab]).
        `cache`: the engine's, or a shallow copy of it (compiled_decode.py's first run)."""
        cache = self.cache if cache is None else cache
        table, position, ids = inputs[:, :width], inputs[:, width : width + 1], inputs[:, width + 1 :]
        positions = cache.set_step(table, position, position + 1, 1, width * cache.page_size,
                                   own_aranges=self.capture or torch.compiler.is_compiling())
        hidden = self.model.model(ids, positions, cache)[:, 0]
        return hidden, self.model.logits(hidden)

    def _weights_key(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in self.tensors)

    def _graph(self, key: tuple[int, int]) -> _Graph | None:
        weights = self._weights_key()
        if weights != self.weights_key:
            self.graphs.clear()
            self.uses.clear()
            self.weights_key = weights
        graph = self.graphs.get(key)
        if graph is None:
            self.uses[key] = self.uses.get(key, 0) + 1
            if self.uses[key] > self.CAPTURE_AFTER:
                graph = self._record(*key)
        return graph

    def _record(self, batch: int, width: int) -> _Graph | None:
        device = self.cache.device
        try:
            with torch.cuda.device(device):
                inputs = torch.zeros(batch, width + 2, dtype=torch.long, device=device)  # all rows padding
                # warm-up outside the graph: lazily built state (derived weights, cached aranges, library
                # handles) is made here, so that the capture allocates none of it in the graph's pool
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    self.forward(inputs, width)
                torch.cuda.current_stream(device).wait_stream(side)
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()  # one pool: graphs never run concurrently
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    outputs = self.forward(inputs, width)
                copied = torch.cuda.Event()
                copied.record()
        except Exception as e:  # a model whose step cannot be recorded decodes the plain way
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); "
                          "decoding without CUDA graphs", RuntimeWarning, stacklevel=2)
            self.enabled = False
            self.graphs.clear()
            return None
        staging = torch.zeros(batch, width + 2, dtype=torch.long, pin_memory=True)
        self.graphs[(batch, width)] = entry = _Graph(graph, inputs, staging, copied, outputs)
        return entry
