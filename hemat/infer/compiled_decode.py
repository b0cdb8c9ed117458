"""The CPU decode step compiled by torch.compile, one static-shape graph per bucket of cuda_graphs.py.

Eagerly, a decode step of a small model costs hundreds of operator calls, each with its dispatch
overhead; inductor fuses the step into a few dozen C++ kernels and library matmuls. A bucket (padded
batch, padded span) is compiled once on a background thread, CAPTURE_AFTER eager uses after it is first
met (the smallest batch-1 bucket right at start-up), while the engine keeps decoding eagerly: compile time
never lands on a request. The compile's first run uses all-padding rows (they write only the cache's
scratch page, as a CUDA graph capture does) and a shallow copy of the cache object, so the step's
bookkeeping on it cannot race with the engine's own step. Where compiling fails (no C++ compiler, an
operator inductor cannot take), one line is printed and every step stays eager. The weights stay graph
inputs (no freezing), so a step reads them as they are."""

from __future__ import annotations

import copy
import threading
import time

import torch


class CompiledDecode:
    CAPTURE_AFTER = 2  # eager uses of a bucket before it is queued for compiling

    def __init__(self, decode, num_buckets: int):
        self.decode = decode  # the BucketedDecode whose forward is compiled
        self.fn = torch.compile(self._forward, dynamic=False, fullgraph=True)
        self.recompile_limit = num_buckets + 8  # one graph per bucket is expected, not a recompile
        self.ready: set[tuple[int, int]] = set()
        self.uses: dict[tuple[int, int], int] = {}
        self.pending: list[tuple[int, int]] = []
        self.lock = threading.Lock()  # guards pending and worker
        self.worker: threading.Thread | None = None
        self.failed = False
        # inductor's settings are per thread: the worker compiles with those of the thread that made the engine
        self.inductor_config = torch._inductor.config.get_config_copy()
        self.compile_seconds = 0.0
        self.compiled_steps = 0

    def _forward(self, inputs: torch.Tensor, cache) -> torch.Tensor:
        return self.decode.forward(inputs, inputs.shape[1] - 2, cache)

    def __call__(self, inputs: torch.Tensor, key: tuple[int, int]) -> torch.Tensor | None:
        """The bucket's compiled step on inputs [rows, W + 2], or None while it is not compiled (yet)."""
        if key in self.ready:
            self.compiled_steps += 1
            return self.fn(inputs, self.decode.cache)
        if not self.failed:
            self.uses[key] = self.uses.get(key, 0) + 1
            if self.uses[key] == self.CAPTURE_AFTER:
                self.queue(key)
        return None

    def queue(self, key: tuple[int, int]) -> None:
        """Compile this bucket on the background thread (started when there is work, gone when there is none)."""
        with self.lock:
            self.pending.append(key)
            if self.worker is None:
                self.worker = threading.Thread(target=self._work, name="hemat-compile", daemon=True)
                self.worker.start()

    def wait(self) -> None:
        """Block until every queued bucket is compiled (tests, benchmarks)."""
        while (worker := self.worker) is not None:
            worker.join()

    def _work(self) -> None:
        while True:
            with self.lock:
                if not self.pending or self.failed:
                    self.pending, self.worker = [], None
                    return
                key = self.pending.pop(0)
            if key not in self.ready:
                self._compile(*key)

    def _compile(self, batch: int, width: int) -> None:
        inputs = torch.zeros(batch, width + 2, dtype=torch.long, device=self.decode.cache.device)  # all padding
        start = time.perf_counter()
        try:
            with (torch.inference_mode(), torch._inductor.config.patch(self.inductor_config),
                  torch._dynamo.config.patch(recompile_limit=self.recompile_limit)):
                self.fn(inputs, copy.copy(self.decode.cache))
        except Exception as e:  # noqa: BLE001 - any compiler failure means: stay eager
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            print(f"hemat: torch.compile of the decode step failed ({type(e).__name__}: {reason}); decoding eagerly")
            self.failed = True
            return
        self.compile_seconds += time.perf_counter() - start
        self.ready.add((batch, width))

    def stats(self) -> dict:
        return dict(decode_compiled_buckets=len(self.ready), decode_compile_s=round(self.compile_seconds, 1),
                    decode_compiled_steps=self.compiled_steps, decode_compile_failed=self.failed)
