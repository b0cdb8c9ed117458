"""What the engine keeps per request: the `Request` a caller holds (iterate it for StreamEvents, `result()`,
`cancel()`), one `SequenceState` per sample (tokens, cache pages, sampler and grammar state) and its
`TextStream` (token ids → released text, stop strings held back, reasoning split off)."""

from __future__ import annotations

import queue
import threading
import time

import torch

from hemat.infer.outputs import RequestOutput, TokenLogprob
from hemat.infer.reasoning import REASONING, ReasoningSplitter
from hemat.infer.sampling import SamplingParams, make_generator, stop_token_set
from hemat.infer.stops import StopMatcher


class TextStream:
    """Token ids → released text: detokenise, hold back what could become a stop string, split reasoning."""

    def __init__(self, tokenizer, params: SamplingParams, split_reasoning: bool, starts_in_reasoning: bool):
        self.decoder = tokenizer.decode_stream(params.skip_special_tokens) if tokenizer is not None else None
        self.stops = StopMatcher(params.stop) if params.stop else None
        self.splitter = ReasoningSplitter(starts_in_reasoning=starts_in_reasoning) if split_reasoning else None
        self.text, self.reasoning = [], []
        self.new_text, self.new_reasoning = [], []

    def push(self, token_id: int) -> bool:
        """Add one generated token; True when a stop string completed."""
        return self.decoder is not None and self._release(self.decoder.step(token_id), final=False)

    def close(self, stopped: bool) -> None:
        if self.decoder is not None:
            self._release("" if stopped else self.decoder.flush(), final=True)

    def _release(self, piece: str, final: bool) -> bool:
        stopped = False
        if self.stops is not None:
            piece, stopped = self.stops.feed(piece)
            if final and not stopped:
                piece += self.stops.flush()
        if self.splitter is None:
            parts = [("content", piece)]
        else:
            parts = self.splitter.feed(piece) + (self.splitter.flush() if final or stopped else [])
        for kind, text in parts:
            (self.new_reasoning if kind == REASONING else self.new_text).append(text)
        return stopped

    def take(self) -> tuple[str, str]:
        text, reasoning = "".join(self.new_text), "".join(self.new_reasoning)
        self.text.append(text)
        self.reasoning.append(reasoning)
        self.new_text, self.new_reasoning = [], []
        return text, reasoning


class SequenceState:
    """One sample of a request: its tokens, pages, sampler state and text stream."""

    def __init__(self, request: Request, index: int, text: TextStream):
        params = request.params
        self.request, self.index, self.params, self.text = request, index, params, text
        self.generator = make_generator(None if params.seed is None else params.seed + index, request.engine.device)
        self.prompt: list[int] = request.prompt_token_ids
        self.output: list[int] = []
        self.stop_ids = stop_token_set(params, request.engine.eos_token_ids)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs else None
        self.pages: list[int] = []
        self.reserve = 0  # pages promised by the allocator, not yet taken
        self.num_cached = 0  # positions 0..num_cached-1 are in the cache
        self.hidden: torch.Tensor | None = None  # speculative state (see speculative.py)
        self.mtp_start = 0
        self.chain = None  # speculative.ChainLength: the sequence's own draft count ("auto")
        self.finish_reason: str | None = None
        self.event_tokens: list[int] = []
        self.event_logprobs: list[TokenLogprob] = []
        self.grammar = None if request.grammar is None else request.engine.grammars.matcher(request.grammar)

    def tokens(self, start: int, end: int) -> list[int]:
        p = len(self.prompt)
        return self.prompt[start:end] + self.output[max(start - p, 0) : max(end - p, 0)]


class Request:
    """A submitted request: iterate it for StreamEvents, `result()` for the RequestOutput, `cancel()`."""

    def __init__(self, engine, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 max_new: int, on_event, split_reasoning: bool, starts_in_reasoning: bool, grammar=None,
                 adapter: int = 0):
        self.engine, self.request_id, self.params, self.grammar = engine, request_id, params, grammar
        self.adapter = adapter  # the index of its LoRA adapter (adapters.py); 0: the base model
        self.prompt_token_ids, self.max_new, self.on_event = prompt_ids, max_new, on_event
        self.cached_tokens = 0
        self.page_keys: list[bytes] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None if params.prompt_logprobs is None else [None]
        self.cancelled = False
        self.sequences = [
            SequenceState(self, i, TextStream(engine.tokenizer, params, split_reasoning, starts_in_reasoning))
            for i in range(params.n)
        ]
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._output: RequestOutput | None = None
        self.error: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    def cancel(self) -> None:
        """Stop generating; the request's cache pages are freed at the next scheduler step."""
        self.cancelled = True
        self.engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self):
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                if self._done.is_set():  # every event was queued before done was set: all consumed
                    return
                if not self.engine.background:
                    self.engine.step()
                    continue
                try:  # wait in slices: if the engine thread stops, this thread drives the steps instead
                    event = self._events.get(timeout=0.5)
                except queue.Empty:
                    continue
            if event is None:
                return
            yield event

    def result(self, timeout: float | None = None) -> RequestOutput:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            if self.engine.background:
                self._done.wait(0.5 if deadline is None else min(0.5, max(deadline - time.monotonic(), 0)))
            else:
                self.engine.step()
        return self._output
