"""The inference engine: a scheduler with continuous batching over a paged KV cache.

Each `step()` admits waiting requests while the cache pool can hold them (a request reserves pages for
its prompt and max_tokens up front, so admitted sequences never have to be preempted; the rest wait),
advances the admitted prompts by one padded prefill forward of at most max_prefill_tokens tokens
(reusing cached prefix pages; long prompts take several steps, so running sequences keep decoding),
then advances every running sequence by one decode forward, or one MTP draft-and-verify round when
the model carries MTP layers (num_speculative_tokens drafts, chained past the MTP depth, or "auto"),
always with speculative="mtp", and with "auto" where measured to be faster (speculative.py: DraftGate).
Sequences leave the batch the step they finish; new ones join. On CUDA the plain decode round runs at
bucketed static shapes, recorded as CUDA graphs (cuda_graphs.py); on CPU with compile_decode, it and greedy
MTP rounds are compiled per bucket in the background (compiled_decode.py).
A constrained request (SamplingParams.guide) gives each of its sequences a grammar state that masks its
row of the logits before sampling (MTP drafts and their verification included) and advances with each
accepted token (constraints.py). With prompt_logprobs the prefill also scores every prompt token
(outputs.py: RequestOutput.prompt_logprobs); max_tokens=0 then stops after the prompt. A request may name
one of the LoRA adapters of a model from adapters.py: each forward tells the model each row's adapter (MTP
drafts come from the base's MTP layers; their verification runs the row's adapter).

Every request sample has its own torch.Generator and every sampling op is row-wise, so a seeded request
gives the same tokens alone or in any batch. `step()` runs either on a background thread (`start()`)
or in the caller's thread when it iterates a request or calls `generate()`. See notes/engine_api.md."""

from __future__ import annotations

import itertools
import math
import numbers
import threading
import time
import traceback
from collections import deque

import torch

from hemat.errors import HematError
from hemat.infer.cache import PagedCache
from hemat.infer.constraints import Grammars
from hemat.infer.compiled_decode import Buckets
from hemat.infer.cuda_graphs import BucketedDecode
from hemat.infer.outputs import CompletionOutput, RequestOutput, StreamEvent, TokenLogprob
from hemat.infer.quantize import prepare_for_inference
from hemat.infer.requests import Request, SequenceState
from hemat.infer.sampling import SamplingParams, gather_logprobs, sample
from hemat.infer.speculative import MTPDrafter

THINK_START = "<think>"


def _unpenalised(params: SamplingParams) -> bool:
    return params.repetition_penalty == 1.0 and not params.frequency_penalty and not params.presence_penalty


class EngineRequestError(HematError):
    """A request the engine cannot serve (too long, bad ids, ...); the message names the value."""


class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 32, cache_tokens: int | None = None,
                 page_size: int = 16, speculative: str = "auto", device=None, max_prefill_tokens: int = 2048,
                 cuda_graphs: str = "auto", num_speculative_tokens: int | str | None = None,
                 compile_decode: bool = False):
        if device is not None:
            model.to(device)
        model = prepare_for_inference(model)  # the inference forms; `model` itself stays as it was
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.device = model.device
        self.max_context = self.config.max_position_embeddings
        self.adapters = getattr(model, "adapters", None)  # per-request LoRA adapters (adapters.py)
        if speculative not in ("auto", "mtp", "off"):
            raise HematError(f"speculative must be 'auto', 'mtp' or 'off', got {speculative!r}")
        if speculative == "mtp" and not model.mtp_layers:
            raise HematError("speculative='mtp' needs a checkpoint with MTP layers (num_nextn_predict_layers > 0)")
        if max_batch_size < 1:
            raise HematError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if cuda_graphs not in ("auto", "on", "eager", "off"):
            raise HematError(f"cuda_graphs must be 'auto', 'on', 'eager' or 'off', got {cuda_graphs!r}")
        if cuda_graphs == "on" and (self.device.type != "cuda" or self.adapters is not None):
            raise HematError(f"cuda_graphs='on' needs a CUDA device and no per-request adapters; the model is on "
                             f"{self.device.type} ('eager' runs the same bucketed decode step without graphs)")
        self.spec_depth = len(model.mtp_layers) if speculative != "off" else 0
        self.max_batch_size, self.page_size, self.max_prefill_tokens = max_batch_size, page_size, max_prefill_tokens
        num_layers = self.config.num_hidden_layers + self.spec_depth
        if cache_tokens is None:
            cache_tokens = self._default_cache_tokens(num_layers)
        if cache_tokens < page_size:
            raise HematError(f"cache_tokens must be at least page_size ({page_size}), got {cache_tokens}")
        self.cache = PagedCache(self.config, math.ceil(cache_tokens / page_size), page_size, model.dtype,
                                self.device, num_layers)
        # plain decode rounds at static shapes: recorded as CUDA graphs ("auto" on CUDA, "on"), or run
        # eagerly ("eager", for tests); on CPU with compile_decode, compiled per bucket by torch.compile in the
        # background (compiled_decode.py), and so are greedy MTP draft-and-verify rounds
        capture = cuda_graphs in ("auto", "on") and self.device.type == "cuda"
        compile_decode = compile_decode and not capture and self.adapters is None
        buckets = Buckets(max_batch_size, self.max_context, page_size) if compile_decode else None
        self.drafter = (MTPDrafter(model, self.cache, num_speculative_tokens, buckets, gated=speculative == "auto")
                        if self.spec_depth else None)
        self.spec_tokens = self.drafter.max_tokens if self.drafter is not None else 0  # cache room past the end
        plain_steps = self.drafter is None or self.drafter.gate is not None
        self.static_decode = (BucketedDecode(model, self.cache, max_batch_size, self.max_context, capture, compile_decode)
                              if (capture or compile_decode or cuda_graphs == "eager") and plain_steps
                              and self.adapters is None else None)
        self.eos_token_ids = list(tokenizer.eos_token_ids) if tokenizer is not None else self.config.eos_token_ids
        self._grammars: Grammars | None = None
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # admitted, prompt not fully in the cache yet
        self.running: list[SequenceState] = []
        self._lock = threading.Lock()  # guards waiting
        self._wakeup = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one scheduler step at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()
        self.counters = dict(requests_finished=0, requests_cancelled=0, cached_prefix_tokens=0,
                             prompt_tokens=0, generated_tokens=0)

    @property
    def compiled_steps(self):
        """The compiled decode steps (compiled_decode.CompiledSteps: plain or MTP rounds), or None."""
        holder = self.drafter if self.drafter is not None else self.static_decode
        return getattr(holder, "compiled", None)

    @property
    def grammars(self) -> Grammars:
        """The grammar compiler, built on first use (it indexes the whole vocabulary)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise EngineRequestError("constrained decoding needs an engine with a tokenizer")
            self._grammars = Grammars(self.tokenizer, self.config.vocab_size, self.eos_token_ids)
        return self._grammars

    def _default_cache_tokens(self, num_layers: int) -> int:
        """Room for every batch slot to reach the full context, within a share of free memory."""
        probe = PagedCache(self.config, 1, 1, self.model.dtype, torch.device("meta"), num_layers)
        per_token = probe.bytes_per_token + probe.mtp_bytes_per_token
        budget = 2 * 1024**3
        if self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * 0.8)
        return max(self.page_size, min(self.max_batch_size * self.max_context, budget // per_token))

    # ---- submitting -----------------------------------------------------------------------------------
    def submit(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None,
               messages: list[dict] | None = None, params: SamplingParams | None = None, on_event=None,
               split_reasoning: bool | None = None, request_id: str | None = None,
               tools: list[dict] | None = None, adapter: str | None = None) -> Request:
        """Queue one request (thread-safe). split_reasoning None: split `<think>…</think>` for chat
        messages whose template uses it. tools: function definitions for the chat template. adapter: the
        name of one of the model's LoRA adapters (None: the base)."""
        if sum(x is not None for x in (prompt, prompt_ids, messages)) != 1:
            raise EngineRequestError("give exactly one of prompt, prompt_ids or messages")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise EngineRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        adapter_index = self._adapter_index(adapter)
        if self.tokenizer is None and (prompt is not None or messages is not None or params.stop):
            raise EngineRequestError("this engine has no tokenizer: give prompt_ids and no stop strings")
        starts_in_reasoning = False
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools or None)
            prompt_ids = self.tokenizer.encode(text)
            starts_in_reasoning = text.rstrip().endswith(THINK_START)
            if split_reasoning is None:
                split_reasoning = THINK_START in (self.tokenizer.chat_template or "")
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise EngineRequestError(f"prompt must be a string, got {type(prompt).__name__}")
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        prompt_ids = self._check_ids(prompt_ids)
        max_new = self._check_lengths(prompt_ids, params)
        if params.n > self.max_batch_size:
            raise EngineRequestError(f"n={params.n} is more than max_batch_size={self.max_batch_size}")
        grammar = None if params.guide is None else self.grammars.compile(params.guide)
        request = Request(self, request_id or f"req-{next(self._ids)}", prompt_ids, params, max_new, on_event,
                          bool(split_reasoning), starts_in_reasoning, grammar, adapter_index)
        with self._lock:
            self.waiting.append(request)
            self._wakeup.notify()
        return request

    def _adapter_index(self, adapter: str | None) -> int:
        if adapter is None:
            return 0
        names = list(self.adapters.index) if self.adapters is not None else []
        if adapter not in names:
            raise EngineRequestError(f"unknown adapter {adapter!r}; this engine has "
                                     f"{', '.join(map(repr, names)) if names else 'none'}")
        return self.adapters.index[adapter]

    def _select_adapters(self, seqs: list[SequenceState]) -> None:
        """Tell the adapted projections each row's adapter before a forward over these sequences."""
        if self.adapters is not None:
            self.adapters.select([s.request.adapter for s in seqs], self.device)

    def _check_ids(self, ids) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        if not isinstance(ids, (list, tuple)):
            raise EngineRequestError(f"prompt_ids must be a list of token ids, got {type(ids).__name__}")
        if not ids:
            raise EngineRequestError("the prompt is empty")
        vocab = self.config.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab:
                raise EngineRequestError(f"prompt_ids[{i}] = {t!r} is not a token id in [0, {vocab})")
        return [int(t) for t in ids]

    def _check_lengths(self, ids: list[int], params: SamplingParams) -> int:
        """The request's token budget, clamped to what the cache pool can ever hold."""
        p, ctx = len(ids), self.max_context
        if p >= ctx:
            raise EngineRequestError(
                f"the prompt has {p} tokens; the model's context is {ctx} tokens, so at most {ctx - 1} fit")
        if params.max_tokens is not None and p + params.max_tokens > ctx:
            raise EngineRequestError(f"max_tokens={params.max_tokens} plus the prompt's {p} tokens exceeds the "
                                     f"model's context of {ctx} tokens (at most {ctx - p})")
        max_new = params.max_tokens if params.max_tokens is not None else ctx - p
        # the most pages one sample may span when all n fit in the pool at once
        n, shared = params.n, self._shareable_pages(p)
        fit = (self.cache.num_pages + (n - 1) * shared) // n * self.page_size - p - self.spec_tokens
        if fit < max_new:
            if params.max_tokens is not None or fit < 1:
                raise EngineRequestError(
                    f"the request ({p} prompt tokens, max_tokens={max_new}, n={n}) needs more KV cache than the "
                    f"pool's {self.cache.capacity_tokens} tokens (raise cache_tokens or lower max_tokens)")
            max_new = fit
        return max_new

    def _shareable_pages(self, prompt_len: int) -> int:
        """Full prompt pages that forks and later prompts may share: never the page of the last prompt
        token (it is recomputed for logits) nor pages whose MTP entries read sampled tokens."""
        return max(prompt_len - max(self.spec_depth, 1), 0) // self.page_size

    def _pages_needed(self, prompt_len: int, max_new: int, n: int, hits: int) -> int:
        per_seq = math.ceil((prompt_len + max_new + self.spec_tokens) / self.page_size)
        return per_seq - hits + (n - 1) * (per_seq - self._shareable_pages(prompt_len))

    # ---- the scheduler ----------------------------------------------------------------------------------
    @property
    def background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the scheduler on a background thread (the server's mode)."""
        if self.background:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="hemat-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _wake(self) -> None:
        with self._lock:
            self._wakeup.notify_all()

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                while not (self.waiting or self.running or self._stopping):
                    self._wakeup.wait()
            try:
                self.step()
            except Exception:  # the affected requests already finished with "error"; keep serving
                traceback.print_exc()

    def step(self) -> None:
        """One scheduler iteration: reap cancellations, admit, one prefill chunk, one decode round."""
        with self._step_lock, torch.inference_mode():
            self._reap_cancelled()
            self.prefilling += self._admit()
            training = self.model.training  # a trainer may share the model (GRPO rollouts): keep its mode
            if training:
                self.model.eval()
            try:
                if self.prefilling:
                    self._prefill_chunk()
                if self.running:
                    self._decode()
            except Exception as e:
                for seq in self.running + [s for r in self.prefilling for s in r.sequences]:
                    seq.request.error = f"{type(e).__name__}: {e}"
                    self._finish(seq, "error")
                self.prefilling = []
                self._flush_events()
                raise
            finally:
                if training:
                    self.model.train()
            self._flush_events()

    def _reap_cancelled(self) -> None:
        with self._lock:
            cancelled = [r for r in self.waiting if r.cancelled]
            for r in cancelled:
                self.waiting.remove(r)
        cancelled += [r for r in self.prefilling if r.cancelled]
        self.prefilling = [r for r in self.prefilling if not r.cancelled]
        for r in cancelled:
            for seq in r.sequences:
                self._finish(seq, "cancelled")
        for seq in list(self.running):
            if seq.request.cancelled:
                self._finish(seq, "cancelled")

    def _admit(self) -> list[Request]:
        """Move waiting requests (first come, first served) into the batch while slots and pages last."""
        alloc, admitted = self.cache.allocator, []
        busy = len(self.running) + sum(r.params.n for r in self.prefilling)
        with self._lock:
            while self.waiting:
                req = self.waiting[0]
                p, n = len(req.prompt_token_ids), req.params.n
                if busy + n > self.max_batch_size:
                    break
                keys = alloc.page_keys(req.prompt_token_ids, self._shareable_pages(p), salt=str(req.adapter))
                hits = alloc.lookup(keys) if req.prompt_logprobs is None else []  # scoring needs every position
                need = self._pages_needed(p, req.max_new, n, len(hits))
                if need + sum(page in alloc.evictable for page in hits) > alloc.available:
                    break
                self.waiting.popleft()
                busy += n
                alloc.acquire(hits)
                alloc.reserved += need
                parent, *children = req.sequences
                per_seq = self._pages_needed(p, req.max_new, 1, 0)
                parent.pages, parent.reserve = list(hits), per_seq - len(hits)
                for child in children:
                    child.reserve = per_seq - self._shareable_pages(p)
                req.cached_tokens, req.page_keys = len(hits) * self.page_size, keys
                parent.num_cached = req.cached_tokens
                self.counters["cached_prefix_tokens"] += req.cached_tokens
                self.counters["prompt_tokens"] += p
                admitted.append(req)
        return admitted

    def _grow(self, seq: SequenceState, num_tokens: int) -> None:
        """Give seq pages for positions < num_tokens."""
        while len(seq.pages) * self.page_size < num_tokens:
            seq.pages.append(self.cache.allocator.allocate())
            seq.reserve -= 1

    def _prefill_chunk(self) -> None:
        """Advance prefilling prompts by up to max_prefill_tokens tokens in one padded forward; prompts
        that complete sample their first token(s) and join the running batch."""
        parents, lengths, width = [], [], 0
        for req in self.prefilling:  # first come first served, padded rows within the token budget
            seq = req.sequences[0]
            n = min(len(seq.prompt) - seq.num_cached, self.max_prefill_tokens)
            if parents and (len(parents) + 1) * max(width, n) > self.max_prefill_tokens:
                break
            parents.append(seq)
            lengths.append(n)
            width = max(width, n)
        starts = [s.num_cached for s in parents]
        for seq, start, n in zip(parents, starts, lengths):
            self._grow(seq, start + n)
        ids = torch.tensor([s.prompt[start : start + n] + [0] * (width - n)
                            for s, start, n in zip(parents, starts, lengths)], device=self.device)
        positions = self.cache.begin_step([s.pages for s in parents], starts, lengths)
        self._select_adapters(parents)
        hidden = self.model.model(ids, positions, self.cache)
        for row, (seq, start, n) in enumerate(zip(parents, starts, lengths)):
            seq.num_cached += n
            if seq.request.prompt_logprobs is not None:
                self._score_prompt(seq, hidden[row, :n], start)
        if self.drafter is not None:
            self.drafter.prefill(parents, hidden, starts, lengths)
        done = [i for i, s in enumerate(parents) if s.num_cached == len(s.prompt)]
        if not done:
            return
        rows = torch.tensor(done, device=self.device)
        last = torch.tensor([lengths[i] - 1 for i in done], device=self.device)
        logits = self.model.logits(hidden[rows, last])
        finished = [parents[i].request for i in done]
        self.prefilling = [r for r in self.prefilling if r not in finished]
        alloc, seqs, row_of = self.cache.allocator, [], []
        for j, req in enumerate(finished):
            parent = req.sequences[0]
            alloc.register(parent.pages, req.page_keys)
            if req.max_new == 0:  # prompt scoring only: nothing to sample
                for seq in req.sequences:
                    self._finish(seq, "length")
                continue
            shared = self._shareable_pages(len(parent.prompt))
            for child in req.sequences[1:]:  # forks share the full prompt pages and copy the rest
                alloc.acquire(parent.pages[:shared])
                child.pages = parent.pages[:shared]
                for page in parent.pages[shared:]:
                    self._grow(child, (len(child.pages) + 1) * self.page_size)
                    self.cache.copy_page(page, child.pages[-1])
                child.num_cached, child.mtp_start, child.hidden = parent.num_cached, parent.mtp_start, parent.hidden
            seqs += req.sequences
            row_of += [j] * len(req.sequences)
        self.running += seqs
        if seqs:
            self._sample_and_append(seqs, logits[torch.tensor(row_of, device=self.device)])

    def _score_prompt(self, seq: SequenceState, hidden: torch.Tensor, start: int) -> None:
        """Logprobs of prompt tokens start+1 .. start+len(hidden) from the hidden states at the positions
        before them, in slices that bound the [rows, vocab] logits."""
        targets = seq.prompt[start + 1 : start + 1 + hidden.shape[0]]
        k = seq.params.prompt_logprobs
        for lo in range(0, len(targets), 256):
            ids = torch.tensor(targets[lo : lo + 256], device=self.device)
            chosen, top_ids, top_lps = gather_logprobs(self.model.logits(hidden[lo : lo + len(ids)]), ids, k)
            for token, (lp, top) in zip(ids.tolist(), self._token_logprobs(chosen, top_ids, top_lps)):
                seq.request.prompt_logprobs.append(TokenLogprob(token, self._token_text(token), lp, top))

    def _decode(self) -> None:
        seqs = list(self.running)
        self._select_adapters(seqs)
        drafts = self.drafter is not None and self.drafter.wants_round(seqs)
        start, generated = time.perf_counter(), self.counters["generated_tokens"]
        if drafts:
            grammars = self.grammars if any(s.grammar is not None for s in seqs) else None
            for seq, (tokens, logprobs) in zip(seqs, self.drafter.step(seqs, self._grow, grammars)):
                self._append(seq, tokens, self._token_logprobs(*logprobs) if logprobs else None)
        else:
            self._plain_decode(seqs)
        if self.drafter is not None:
            emitted = self.counters["generated_tokens"] - generated
            self.drafter.record(seqs, drafts, time.perf_counter() - start, emitted)

    def _plain_decode(self, seqs: list[SequenceState]) -> None:
        for seq in seqs:
            self._grow(seq, seq.num_cached + 1)
        if self.static_decode is not None and self.static_decode.enabled:
            hidden, logits = self.static_decode([s.output[-1] for s in seqs], [s.pages for s in seqs],
                                                [s.num_cached for s in seqs])
        else:
            ids = torch.tensor([[s.output[-1]] for s in seqs], device=self.device)
            positions = self.cache.begin_step([s.pages for s in seqs], [s.num_cached for s in seqs], [1] * len(seqs))
            hidden = self.model.model(ids, positions, self.cache)[:, 0]
            logits = self.model.logits(hidden)
        for seq in seqs:
            seq.num_cached += 1
        if self.drafter is not None:  # the MTP caches' inputs for a later round
            self.drafter.advance(seqs, hidden)
        self._sample_and_append(seqs, logits)

    def _sample_and_append(self, seqs: list[SequenceState], logits: torch.Tensor) -> None:
        if any(s.grammar is not None for s in seqs):
            logits = self.grammars.mask(logits, [s.grammar for s in seqs])
        if all(s.params.greedy and not s.params.logprobs and _unpenalised(s.params) for s in seqs):
            for seq, token in zip(seqs, logits.argmax(dim=-1).tolist()):  # what sample() picks, in one call
                self._append(seq, [token], None)
            return
        out = sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                     [s.prompt for s in seqs], [s.output for s in seqs])
        tokens = out.token_ids.tolist()
        for i, seq in enumerate(seqs):
            logprobs = None
            if seq.params.logprobs:
                k = seq.params.top_logprobs
                top = (out.top_token_ids[i : i + 1, :k], out.top_logprobs[i : i + 1, :k]) if k else (None, None)
                logprobs = self._token_logprobs(out.logprobs[i : i + 1], *top)
            self._append(seq, [tokens[i]], logprobs)

    def _token_logprobs(self, chosen, top_ids, top_lps) -> list[tuple[float, list]]:
        """Tensors from sampling (chosen [N], top ids / logprobs [N, K] or None) → (logprob, top) per token."""
        chosen = chosen.tolist()
        if top_ids is None:
            return [(lp, []) for lp in chosen]
        return [(lp, [(t, self._token_text(t), v) for t, v in zip(ids, lps)])
                for lp, ids, lps in zip(chosen, top_ids.tolist(), top_lps.tolist())]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def _append(self, seq: SequenceState, tokens: list[int], logprobs: list | None) -> None:
        """Add newly sampled tokens to seq, stopping at the first that ends it."""
        request = seq.request
        if request.t_first is None:
            request.t_first = time.perf_counter()
        for j, token in enumerate(tokens):
            seq.output.append(token)
            seq.event_tokens.append(token)
            self.counters["generated_tokens"] += 1
            if logprobs is not None:
                lp, top = logprobs[j]
                entry = TokenLogprob(token, self._token_text(token), lp, top)
                seq.logprobs.append(entry)
                seq.event_logprobs.append(entry)
            if seq.grammar is not None and (not seq.grammar.accept_token(token) or seq.grammar.is_terminated()):
                self._finish(seq, "stop")  # the grammar is complete (a refused token cannot pass the mask)
            elif token in seq.stop_ids:
                self._finish(seq, "stop")
            elif seq.text.push(token):
                self._finish(seq, "stop", stopped_by_string=True)
            elif len(seq.output) >= request.max_new or len(seq.prompt) + len(seq.output) >= self.max_context:
                self._finish(seq, "length")
            if seq.finish_reason is not None:
                return

    def _finish(self, seq: SequenceState, reason: str, stopped_by_string: bool = False) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        seq.text.close(stopped_by_string)
        alloc = self.cache.allocator
        alloc.release(seq.pages)
        alloc.reserved -= seq.reserve
        seq.pages, seq.reserve, seq.hidden = [], 0, None
        if seq.grammar is not None:
            self.grammars.release(seq.grammar)
            seq.grammar = None
        if seq in self.running:
            self.running.remove(seq)
        self._emit(seq)
        request = seq.request
        if all(s.finish_reason is not None for s in request.sequences):
            self._complete(request)

    def _flush_events(self) -> None:
        for seq in self.running:
            if seq.event_tokens:
                self._emit(seq)

    def _emit(self, seq: SequenceState) -> None:
        text, reasoning = seq.text.take()
        event = StreamEvent(seq.request.request_id, seq.index, text, reasoning, seq.event_tokens,
                            seq.event_logprobs if seq.params.logprobs else None, seq.finish_reason)
        seq.event_tokens, seq.event_logprobs = [], []
        self._deliver(seq.request, event)

    def _deliver(self, request: Request, event) -> None:
        request._events.put(event)
        if request.on_event is not None and event is not None:
            try:
                request.on_event(event)
            except Exception:  # a broken callback must not stop the scheduler
                traceback.print_exc()
                request.cancelled = True

    def _complete(self, request: Request) -> None:
        now = time.perf_counter()
        outputs = [CompletionOutput(s.index, "".join(s.text.text), "".join(s.text.reasoning), s.output, s.logprobs,
                                    s.finish_reason) for s in request.sequences]
        generated = sum(len(s.output) for s in request.sequences)
        first = request.t_first or now
        metrics = {
            "prompt_tokens": len(request.prompt_token_ids),
            "completion_tokens": generated,
            "cached_tokens": request.cached_tokens,
            "ttft_s": first - request.t_submit,
            "total_s": now - request.t_submit,
            "decode_tokens_per_s": (generated - len(request.sequences)) / (now - first) if now > first else 0.0,
        }
        request._output = RequestOutput(request.request_id, request.prompt_token_ids, request.cached_tokens,
                                        outputs, metrics, request.error, request.prompt_logprobs)
        self.counters["requests_cancelled" if request.cancelled else "requests_finished"] += 1
        request._done.set()
        self._deliver(request, None)

    # ---- conveniences -----------------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (strings, token-id lists or chat message lists) to completion, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]  # one prompt: text, token ids or a conversation
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise EngineRequestError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        requests = []
        try:
            for prompt, p in zip(prompts, params_list):
                if isinstance(prompt, str):
                    requests.append(self.submit(prompt, params=p))
                elif isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
                    requests.append(self.submit(messages=prompt, params=p))
                else:
                    requests.append(self.submit(prompt_ids=prompt, params=p))
        except HematError:  # one bad prompt: run none of them
            for r in requests:
                r.cancel()
            raise
        return [r.result() for r in requests]

    def stats(self) -> dict:
        alloc = self.cache.allocator
        with self._lock:
            waiting = len(self.waiting)
        out = dict(self.counters, running=len(self.running), prefilling=len(self.prefilling), waiting=waiting,
                   pages_total=self.cache.num_pages, pages_free=alloc.num_free, page_size=self.page_size,
                   cache_tokens=self.cache.capacity_tokens, kv_bytes_per_token=self.cache.bytes_per_token,
                   speculative_depth=self.spec_depth, speculative_tokens=self.spec_tokens,
                   weight_format=self.model.weight_format, weight_bytes=self.model.weight_bytes,
                   decode_graphs=len(self.static_decode.graphs) if self.static_decode is not None else 0)
        if self.compiled_steps is not None:
            out.update(self.compiled_steps.stats())
        out.update(self._grammars.stats() if self._grammars is not None else Grammars.idle_stats())
        if self.drafter is not None:
            out.update(spec_rounds=self.drafter.rounds, spec_drafted=self.drafter.drafted, spec_accepted=self.drafter.accepted,
                       spec_acceptance_rate=self.drafter.acceptance_rate)
        return out
