"""CPU decode steps compiled by torch.compile, one static-shape graph per bucket: the plain decode step
(cuda_graphs.py's BucketedDecode) and the MTP draft-and-verify round (speculative.py).

Eagerly, a decode step of a small model costs hundreds of operator calls, each with its dispatch
overhead; inductor fuses the step into a few dozen C++ kernels and library matmuls. A bucket (padded
batch, padded span, and for MTP rounds the number of drafts) is compiled once on a background thread,
CAPTURE_AFTER eager uses after it is first met (the first request's bucket right at start-up), while the
engine keeps decoding eagerly: compile time never lands on a request. The compile's first run uses
all-padding rows (they write only the cache's scratch page, as a CUDA graph capture does) and a shallow
copy of the cache object, so the step's bookkeeping on it cannot race with the engine's own step. Where
compiling fails (no C++ compiler, an operator inductor cannot take), one line is printed and every step
stays eager. The weights stay graph inputs (no freezing), so a step reads them as they are. A process
that exits while a bucket compiles drops the queued ones and waits for that one (which, with the
compiler's own exit hooks run, soon fails, silently): the interpreter shutting down under the compiler
thread would abort the process."""

from __future__ import annotations

import atexit
import copy
import threading
import time
import weakref
from collections.abc import Callable

import torch

MIN_SPAN = 256  # the smallest attended-span bucket, in tokens


class Buckets:
    """The padded shapes of static steps: the batch to 1, 2, 4, 8, ... (up to max_batch_size), the attended
    span to MIN_SPAN · 2^k tokens in whole pages (up to the context)."""

    def __init__(self, max_batch_size: int, max_context: int, page_size: int):
        self.page_size = page_size
        self.batches = sorted({min(1 << i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)})
        limit = -(-max_context // page_size) * page_size
        spans, span = [], -(-MIN_SPAN // page_size) * page_size
        while span < limit:
            spans.append(span)
            span *= 2
        self.spans = spans + [limit]

    def __call__(self, rows: int, span: int) -> tuple[int, int]:
        """(padded batch, padded span in pages) for `rows` sequences attending to at most `span` positions."""
        batch = next(b for b in self.batches if b >= rows)
        tokens = next(s for s in self.spans if s >= span)
        return batch, tokens // self.page_size

    def __len__(self) -> int:
        return len(self.batches) * len(self.spans)


_LIVE: weakref.WeakSet = weakref.WeakSet()  # every CompiledSteps, for the exit hook


@atexit.register
def _finish_compiles() -> None:
    for steps in list(_LIVE):
        with steps.lock:
            steps.pending.clear()
            steps.closing = True
        steps.wait()


class CompiledSteps:
    """`forward(*args, cache=...)` compiled per bucket key. get(key) → the compiled step or None while
    that bucket is not compiled (yet); example(key) → all-padding args of that bucket for its first run."""

    CAPTURE_AFTER = 2  # eager uses of a bucket before it is queued for compiling

    def __init__(self, forward: Callable, example: Callable, cache, num_buckets: int):
        self.example, self.cache = example, cache
        self.fn = torch.compile(forward, dynamic=False, fullgraph=True)
        self.recompile_limit = num_buckets + 8  # one graph per bucket is expected, not a recompile
        self.ready: set[tuple] = set()
        self.uses: dict[tuple, int] = {}
        self.pending: list[tuple] = []
        self.lock = threading.Lock()  # guards pending and worker
        self.worker: threading.Thread | None = None
        self.failed = self.closing = False  # closing: the process exits
        # inductor's settings are per thread: the worker compiles with those of the thread that made the engine
        self.inductor_config = torch._inductor.config.get_config_copy()
        # shapes are static per bucket: the size and stride checks of every graph input (each parameter) and
        # operator output would cost ~1.3 us each, ~0.8 ms a step for a 30-layer model
        self.inductor_config["size_asserts"] = False
        self.compile_seconds = 0.0
        self.compiled_steps = 0
        _LIVE.add(self)

    def get(self, key: tuple) -> Callable | None:
        if key in self.ready:
            self.compiled_steps += 1
            return lambda *args: self.fn(*args, cache=self.cache)
        if not self.failed:
            self.uses[key] = self.uses.get(key, 0) + 1
            if self.uses[key] == self.CAPTURE_AFTER:
                self.queue(key)
        return None

    def queue(self, key: tuple) -> None:
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
                self._compile(key)

    def _compile(self, key: tuple) -> None:
        start = time.perf_counter()
        try:
            with (torch.inference_mode(), torch._inductor.config.patch(self.inductor_config),
                  torch._dynamo.config.patch(recompile_limit=self.recompile_limit)):
                self.fn(*self.example(key), cache=copy.copy(self.cache))
        except Exception as e:  # noqa: BLE001 - any compiler failure means: stay eager
            if self.closing:
                return
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            print(f"hemat: torch.compile of the decode step failed ({type(e).__name__}: {reason}); decoding eagerly")
            self.failed = True
            return
        self.compile_seconds += time.perf_counter() - start
        self.ready.add(key)

    def stats(self) -> dict:
        return dict(decode_compiled_buckets=len(self.ready), decode_compile_s=round(self.compile_seconds, 1),
                    decode_compiled_steps=self.compiled_steps, decode_compile_failed=self.failed)
