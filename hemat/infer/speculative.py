"""Speculative decoding with the checkpoint's own multi-token-prediction modules (DeepSeek-V3 §2.2, §5.4.3),
chained past their depth as vLLM and SGLang do for DeepSeek-V3's single MTP layer.

Notation for one sequence: x_0..x_m are its tokens so far; x_m (just sampled) is not in the main cache
yet; h_j is the main model's final normalised hidden state at position j (it predicted x_{j+1}).
MTP depth k (1..D) at position j reads h^{k-1}_j (h^0 = h) and the embedding of x_{j+k}, attends over
its own cache (layer num_hidden_layers + k - 1) and predicts x_{j+k+1}.

One round with n draft tokens:
  1. draft: every depth runs over positions [mtp_start, m-1]; the output of depth k at m - 1 is draft
     d_k (a guess for x_{m+k}). Tokens past x_m fed to deeper depths are the drafts themselves. Past
     depth D the last depth runs again one position on, on its own output and the last draft: draft
     d_{D+i} comes from depth D at position m - 1 + i (its own output standing in for h^{D-1}).
  2. verify: one main-model forward over [x_m, d_1..d_n] at positions m..m+n gives the target
     distributions at n + 1 positions; a prefix of a drafts is accepted (greedy: equal to the argmax;
     sampling: Leviathan-Chen rejection sampling, exact in distribution) and one token of the target's
     own is added. The cache then holds positions up to m + a; entries past it (and the chained
     drafts' MTP entries) are overwritten before anything reads them.
Entries of depth k at positions j <= m - k were computed from committed tokens only; the later ones
read drafts, so the next round recomputes every depth from mtp_start = m - D + 1. The sequence keeps
the main hidden states from mtp_start on for that (D rows; one for DeepSeek-V3's single depth).

The number of drafts n is fixed (num_speculative_tokens=N; by default the MTP depth D, the fastest
measured on CPU for DeepSeek-V3's D = 1) or chosen per sequence and round ("auto"):
the longest chain (up to AUTO_MAX_TOKENS) that the sequence's running record says is accepted whole at
least AUTO_MIN_PROBABILITY of the time. Per sequence, so that a seeded request draws the same alone or
in any batch. A batch drafts as many as its longest sampled row, or the shortest greedy one (a longer
chain costs every row its verify positions), and a row verifies only its own.

Whether a decode step drafts at all: always with speculative="mtp"; with "auto", as DraftGate measures.
Drafts pay only when a round's extra work (the MTP forward, the verify positions) costs less than the
tokens they add, which depends on the acceptance (stale MTP layers after fine-tuning accept few) and on the
machine. "auto" drafts only for greedy rows, whose output no drafting decision changes: a timing-driven
choice would change a seeded sampled row's draws, so sampled rows decode plainly (0 drafts of their own).
After plain steps a sequence keeps the main hidden states since mtp_start, and the next round fills its MTP
caches over them; past CATCH_UP_ROWS (or before a compiled round) they are filled in one MTP-only pass.

A round whose rows are all plain greedy runs on tensors alone (greedy_round: drafts, verify forward and
acceptance), so that on CPU it can be compiled per bucket (padded batch, span, n) as the plain decode
step is (compiled_decode.py); padding rows write only the cache's scratch page."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from hemat.errors import HematError
from hemat.infer.compiled_decode import Buckets, CompiledSteps
from hemat.infer.sampling import gather_logprobs, process_logits, verify_drafts

AUTO_MAX_TOKENS = 3  # the longest chain "auto" drafts
AUTO_MIN_PROBABILITY = 0.75  # draft j only while drafts 1..j are all accepted this often (a verify
# position costs a fair share of a decode step once a CPU batch is compute-bound: 0.6 lost at batch 16)
DECAY = 0.98  # the running acceptance statistics forget at this rate per round
CATCH_UP_ROWS = 256  # main hidden states a sequence keeps for its MTP caches before they are filled


def plain_greedy(params) -> bool:
    """Greedy with nothing that needs per-row Python: the argmax of the raw logits is the token."""
    return (params.greedy and not params.logprobs and params.repetition_penalty == 1.0
            and not params.frequency_penalty and not params.presence_penalty)


class ChainLength:
    """One sequence's running acceptance per draft position → how many drafts its next round makes
    ("auto"). Each sequence keeps its own, so a seeded request drafts (and draws) the same alone or
    in any batch."""

    def __init__(self, max_tokens: int):
        # decayed counts per draft position j: rounds that drafted it after accepting drafts 0..j-1, and
        # rounds that accepted it too
        self.tried, self.accepted = [0.0] * max_tokens, [0.0] * max_tokens

    def next(self) -> int:
        """The longest chain whose drafts are all accepted with probability >= AUTO_MIN_PROBABILITY, from
        each position's conditional rate. The rates start at 1 (one accepted try as the prior), and a poor
        record fades, so longer chains are tried again now and then."""
        n, chance = 1, 1.0
        for j, (tried, accepted) in enumerate(zip(self.tried, self.accepted)):
            chance *= (accepted + 1) / (tried + 1)
            if chance < AUTO_MIN_PROBABILITY:
                break
            n = j + 1
        return n

    def record(self, accepted: int, drafted: int) -> None:
        for j in range(len(self.tried)):
            self.tried[j] = self.tried[j] * DECAY + (j < drafted and j <= accepted)
            self.accepted[j] = self.accepted[j] * DECAY + (j < accepted)


class DraftGate:
    """speculative="auto": whether a decode step runs a draft-and-verify round or a plain step, from the
    measured speed of each per batch bucket (rows rounded up to a power of two): the mean tokens a step
    emits over its last TOKENS_WINDOW steps (a round's acceptance varies with the text) over the median of
    its last WINDOW steps' seconds (the median: a loaded machine stalls a step now and then by 10× and
    more). Each mode is measured first (SAMPLES steps, after WARM discarded ones: first calls, allocations);
    then the faster runs (drafting only when faster by MARGIN: near break-even a round's extra work is not
    worth its noise), and the slower is timed again (SAMPLES steps, its old times dropped as stale)
    after `retry` steps, doubling while it keeps losing (up to MAX_RETRY), so that a change in acceptance
    or in cost (a bucket compiled, a longer context, other load) is seen."""

    WARM, SAMPLES, WINDOW, TOKENS_WINDOW = 1, 3, 8, 64
    RETRY, MAX_RETRY = 16, 512
    MARGIN = 0.05

    def __init__(self):
        self.buckets: dict[int, dict] = {}

    def _bucket(self, rows: int) -> dict:
        key = 1 << (rows - 1).bit_length()
        if key not in self.buckets:  # per mode (True: drafting): recent steps' seconds and tokens, steps seen
            self.buckets[key] = dict(seconds={True: [], False: []}, tokens={True: [], False: []},
                                     seen={True: 0, False: 0}, since=0, retry=self.RETRY, retry_left=0,
                                     retry_mode=False)
        return self.buckets[key]

    def speed(self, rows: int, drafted: bool) -> float | None:
        """Tokens per second of the mode in this batch bucket, as measured (None: not yet)."""
        b = self._bucket(rows)
        seconds, tokens = sorted(b["seconds"][drafted]), b["tokens"][drafted]
        if not seconds:
            return None
        return sum(tokens) / len(tokens) / max(seconds[len(seconds) // 2], 1e-9)

    def drafts(self, rows: int) -> bool:
        """Whether the next step of a batch of `rows` drafts."""
        b = self._bucket(rows)
        for mode in (True, False):
            if b["seen"][mode] < self.WARM + self.SAMPLES:
                return mode
        if not b["retry_left"] and b["since"] >= b["retry"]:  # retry the slower: its old record is stale
            b["retry_mode"] = slower = not self._pays(rows)
            b["retry_left"] = self.SAMPLES
            b["seconds"][slower].clear()
        if b["retry_left"]:
            return b["retry_mode"]
        return self._pays(rows)

    def _pays(self, rows: int) -> bool:
        return self.speed(rows, True) > (1 + self.MARGIN) * self.speed(rows, False)

    def record(self, rows: int, drafted: bool, seconds: float, tokens: int) -> None:
        """One step's measurement: it drafted or not, took `seconds` and emitted `tokens`."""
        b = self._bucket(rows)
        b["seen"][drafted] += 1
        if b["seen"][drafted] <= self.WARM:
            return
        b["seconds"][drafted][:] = b["seconds"][drafted][1 - self.WINDOW :] + [seconds]
        b["tokens"][drafted][:] = b["tokens"][drafted][1 - self.TOKENS_WINDOW :] + [tokens]
        if b["retry_left"] and drafted == b["retry_mode"]:
            b["retry_left"] -= 1
            if not b["retry_left"]:  # again the slower: retried later still; now the faster: the usual wait
                still_slower = drafted != self._pays(rows)
                b["since"], b["retry"] = 0, min(b["retry"] * 2, self.MAX_RETRY) if still_slower else self.RETRY
        elif min(b["seen"].values()) >= self.WARM + self.SAMPLES:
            b["since"] += 1


class MTPDrafter:
    def __init__(self, model, cache, num_speculative_tokens: int | str | None = None, buckets: Buckets | None = None,
                 gated: bool = False):
        """buckets: compile plain greedy rounds per (padded batch, span, drafts) bucket (compiled_decode.py).
        gated: speculative="auto" (DraftGate decides which steps draft; sampled rows never do)."""
        self.model, self.cache = model, cache
        self.gate = DraftGate() if gated else None
        self.depth = len(model.mtp_layers)
        num_speculative_tokens = self.depth if num_speculative_tokens is None else num_speculative_tokens
        self.adaptive = num_speculative_tokens == "auto"
        if not self.adaptive and (isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int)
                                  or num_speculative_tokens < 1):
            raise HematError(f"num_speculative_tokens must be 'auto' or an integer >= 1, got {num_speculative_tokens!r}")
        self.max_tokens = max(AUTO_MAX_TOKENS, self.depth) if self.adaptive else num_speculative_tokens
        self.rounds = self.drafted = self.accepted = 0  # rounds are counted per sequence
        self.bucket, self.compiled = buckets, None
        if buckets is not None:
            self.compiled = CompiledSteps(self.greedy_round, self.example, cache, len(buckets) * self.max_tokens)
            self.compiled.queue((*buckets(1, 1), self.max_tokens))  # the first request's first round

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def wants_round(self, seqs: Sequence) -> bool:
        """Whether this decode step drafts. A round after plain steps first fills the MTP caches of rows that
        kept more hidden states than a compiled round takes (not part of the round the gate times)."""
        if self.gate is not None and not (any(s.params.greedy for s in seqs) and self.gate.drafts(len(seqs))):
            return False
        self._catch_up([s for s in seqs if len(s.hidden) > self.max_tokens + self.depth])
        return True

    def record(self, seqs: Sequence, drafted: bool, seconds: float, tokens: int) -> None:
        """A decode step's time and emitted tokens, for the gate."""
        if self.gate is not None and any(s.params.greedy for s in seqs):
            self.gate.record(len(seqs), drafted, seconds, tokens)

    def advance(self, seqs: Sequence, hidden: torch.Tensor) -> None:
        """After a plain decode step (hidden [B, H] at each row's new position): keep it for the MTP caches."""
        for i, s in enumerate(seqs):
            s.hidden = torch.cat((s.hidden, hidden[i : i + 1]))
        self._catch_up([s for s in seqs if len(s.hidden) > CATCH_UP_ROWS])

    def _catch_up(self, seqs: Sequence) -> None:
        """Fill the MTP caches over every position whose inputs are committed tokens (j < num_cached - D),
        keeping the last D hidden states, as after a prefill."""
        if not seqs:
            return
        ends = [s.num_cached - self.depth for s in seqs]
        self._fill(seqs, [s.hidden[: e - s.mtp_start] for s, e in zip(seqs, ends)], [s.mtp_start for s in seqs], ends)
        for s, e in zip(seqs, ends):
            s.hidden, s.mtp_start = s.hidden[e - s.mtp_start :], e

    def _num_tokens(self, seq) -> int:
        if self.gate is not None and not seq.params.greedy:
            return 0
        if not self.adaptive:
            return self.max_tokens
        if seq.chain is None:
            seq.chain = ChainLength(self.max_tokens)
        return seq.chain.next()

    def prefill(self, seqs: Sequence, hidden: torch.Tensor, starts: Sequence[int], lengths: Sequence[int]) -> None:
        """After a main prefill chunk (hidden [B, T, H] for positions starts[i] + 0..lengths[i]-1): fill
        the MTP caches over the positions whose inputs are all prompt tokens (j < P - D), and collect
        the hidden states from P - D on for the first draft round."""
        d, rows, ends = self.depth, [], []
        for i, s in enumerate(seqs):
            p, start, end = len(s.prompt), starts[i], starts[i] + lengths[i]
            if min(end, p - d) > start:
                rows.append(i)
                ends.append(min(end, p - d))
            s.mtp_start = max(p - d, 0)
            tail = hidden[i, max(s.mtp_start - start, 0) : lengths[i]]
            s.hidden = tail.clone() if s.hidden is None else torch.cat((s.hidden, tail))
        if rows:
            self._fill([seqs[i] for i in rows], [hidden[i, : e - starts[i]] for i, e in zip(rows, ends)],
                       [starts[i] for i in rows], ends)

    def _fill(self, seqs: Sequence, hidden: Sequence[torch.Tensor], starts: Sequence[int], ends: Sequence[int]) -> None:
        """Run every MTP depth over positions starts[i]..ends[i]-1 of each sequence (hidden[i]: the main hidden
        states there; the tokens they read, up to ends[i] + D - 1, are committed): its MTP caches there."""
        d, lengths = self.depth, [e - a for a, e in zip(starts, ends)]
        t = max(lengths)
        positions = self.cache.begin_step([s.pages for s in seqs], list(starts), lengths)
        rope = self.model.model.rotary_emb(positions)
        ids = self._ids([s.tokens(a + 1, e + d) for s, a, e in zip(seqs, starts, ends)], t + d)
        h = pad_sequence(list(hidden), batch_first=True)
        for k in range(d):
            h = self.model.mtp_depth(k, h, ids[:, k : k + t], rope, self.cache)

    def step(self, seqs: Sequence, grow: Callable, grammars=None) -> list[tuple[list[int], list | None]]:
        """One draft-and-verify round for every sequence → per sequence (emitted tokens, raw logprobs
        as (logprob, top ids, top logprobs) tensors or None). grammars (constraints.Grammars): masks the
        drafts and target rows of sequences with a grammar state (`s.grammar`)."""
        d = self.depth
        ns = [self._num_tokens(s) for s in seqs]  # drafts per row
        # a batch drafts (and verifies) as many as its longest row wants: sampled rows keep their own count
        # (it decides their random draws), greedy rows, whose output no count changes, the fewest of theirs
        greedy = [k for k, s in zip(ns, seqs) if s.params.greedy]
        n = max([k for k, s in zip(ns, seqs) if not s.params.greedy] + [min(greedy, default=1)])
        ns = [min(k, n) for k in ns]
        ms = [s.num_cached for s in seqs]
        for s, m in zip(seqs, ms):
            grow(s, m + n + 1)  # the verify forward's positions; chained drafts write before them
        if grammars is None and all(plain_greedy(s.params) for s in seqs):  # every row drafts n
            best, accepted, hidden = self._greedy_round(seqs, ms, n)
            results = [(tokens[: a + 1], None) for tokens, a in zip(best.tolist(), accepted)]
        else:
            span = max(ms) + n + 1
            inputs, hidden = self._round_inputs(seqs, ms, len(seqs), -(-span // self.cache.page_size))
            drafts, qs = self._draft(seqs, inputs, hidden, n, ns, span, grammars)  # [B, n]
            hidden, logits = self.verify_forward(inputs, drafts, span, self.cache)
            own_drafts = [row[:k] for row, k in zip(drafts.tolist(), ns)]
            results, accepted = self._verify(seqs, logits, own_drafts, qs, grammars)
        for i, (s, m, a) in enumerate(zip(seqs, ms, accepted)):
            s.num_cached = m + a + 1
            s.hidden = hidden[i, : a + 1] if d == 1 else torch.cat((s.hidden[len(s.hidden) - (d - 1) :], hidden[i, : a + 1]))
            s.mtp_start = m - d + 1
            if s.chain is not None:
                s.chain.record(a, ns[i])
        self.rounds += sum(k > 0 for k in ns)
        self.drafted += sum(ns)
        self.accepted += sum(accepted)
        return results

    def _greedy_round(self, seqs, ms, n: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """A plain greedy round, compiled for its bucket where that is ready, else eagerly at its own shapes."""
        span = max(ms) + n + 1
        if self.compiled is not None:
            batch, width = self.bucket(len(seqs), span)
            compiled = self.compiled.get((batch, width, n))
            if compiled is not None:
                inputs, hidden = self._round_inputs(seqs, ms, batch, width, self.max_tokens + self.depth)
                best, accepted, hidden = compiled(inputs, hidden, n, width * self.cache.page_size)
                rows = len(seqs)  # the padding rows' results are dropped
                return best[:rows], accepted[:rows].tolist(), hidden[:rows]
        inputs, hidden = self._round_inputs(seqs, ms, len(seqs), -(-span // self.cache.page_size))
        best, accepted, hidden = self.greedy_round(inputs, hidden, n, span)
        return best, accepted.tolist(), hidden

    def greedy_round(self, inputs: torch.Tensor, hidden: torch.Tensor, n: int, span: int, cache=None):
        """A greedy round on tensors (_round_inputs'), eager or compiled per bucket (then `cache` is the
        engine's, or a shallow copy of it for the compile's first run): the drafts are the MTP argmaxes, the
        accepted ones equal the target's argmax, up to the first that does not → (the target's argmax
        [B, n + 1], accepted counts [B], the main hidden states [B, n + 1, H])."""
        cache = self.cache if cache is None else cache
        drafts = torch.stack(self.draft_chain(inputs, hidden, n, span, cache, lambda logits, _: logits.argmax(-1)), 1)
        hidden, logits = self.verify_forward(inputs, drafts, span, cache)
        best = logits.argmax(-1)
        return best, (best[:, :n] == drafts).cumprod(1).sum(1), hidden

    def _round_inputs(self, seqs, ms, batch: int, width: int, t: int | None = None):
        """One int64 row per sequence, [mtp_start | m | x_m | block table (width pages) | x_{mtp_start+1}..x_m],
        and the main hidden states kept from mtp_start on [batch, t, H] (t: at least the longest). Rows past
        the sequences are padding: the scratch page, as after a prefill of d tokens."""
        d, rows = self.depth, []
        starts = [s.mtp_start for s in seqs]
        t = max(m - start for m, start in zip(ms, starts)) if t is None else t
        for s, start, m in zip(seqs, starts, ms):
            table, tokens = s.pages[:width], s.tokens(start + 1, m + 1)
            rows.append([start, m, s.output[-1]] + table + [0] * (width - len(table)) + tokens
                        + [0] * (t + d - len(tokens)))
        rows += [[0, d, 0] + [0] * (width + t + d)] * (batch - len(seqs))
        hidden = seqs[0].hidden.new_zeros(batch, t, self.model.config.hidden_size)
        for i, s in enumerate(seqs):
            hidden[i, : len(s.hidden)] = s.hidden
        return torch.tensor(rows, device=self.model.device), hidden

    def example(self, key: tuple[int, int, int]) -> tuple:
        """A compile bucket's all-padding inputs: (batch, width, n) → greedy_round's arguments."""
        batch, width, n = key
        t, d = self.max_tokens + self.depth, self.depth
        inputs = torch.tensor([[0, d, 0] + [0] * (width + t + d)] * batch, device=self.model.device)
        hidden = torch.zeros(batch, t, self.model.config.hidden_size, dtype=self.model.dtype, device=self.model.device)
        return inputs, hidden, n, width * self.cache.page_size

    def draft_chain(self, inputs: torch.Tensor, hidden: torch.Tensor, n: int, span: int, cache, pick) -> list:
        """max(n, d) drafts [B] each (the first n are the round's): every depth over the positions from
        mtp_start to m - 1, then the last depth chained one position on at a time. pick(logits, drafts so
        far) → the next draft per row."""
        model, d, b, t = self.model, self.depth, *hidden.shape[:2]
        start, m, _, table, ids = self._fields(inputs, span, cache)  # ids: x_{start+1}..x_m, then the drafts
        own = torch.compiler.is_compiling()
        rope = model.model.rotary_emb(cache.set_step(table, start, m, t, span, own_aranges=own))
        rows, last = torch.arange(b, device=hidden.device), (m - start - 1)[:, 0]
        drafts = []
        for j in range(max(n, d)):
            if j < d:  # depth j + 1 over every position: depth j's output and the tokens j + 1 ahead
                hidden = model.mtp_depth(j, hidden, ids[:, j : j + t], rope, cache)
                out = hidden[rows, last]
            else:  # chained: the last depth one position on, on its own output and the last draft
                position = m + j - d
                rope = model.model.rotary_emb(cache.set_step(table, position, position + 1, 1, span, own_aranges=own))
                out = model.mtp_depth(d - 1, out[:, None], drafts[-1][:, None], rope, cache)[:, 0]
            token = pick(model.logits(model.mtp_layers[min(j, d - 1)].shared_head.norm(out)), drafts)
            drafts.append(token)
            if j + 1 < d:
                ids = ids.index_put((rows, last + j + 1), token)
        return drafts[:n]

    @staticmethod
    def _fields(inputs: torch.Tensor, span: int, cache) -> tuple[torch.Tensor, ...]:
        """_round_inputs' rows → (mtp_start [B, 1], m [B, 1], x_m [B, 1], block tables [B, W], tokens [B, t + d])."""
        width = -(-span // cache.page_size)
        return inputs[:, :1], inputs[:, 1:2], inputs[:, 2:3], inputs[:, 3 : 3 + width], inputs[:, 3 + width :]

    def verify_forward(self, inputs: torch.Tensor, drafts: torch.Tensor, span: int, cache):
        """The main model over [x_m, d_1..d_n] at positions m..m+n → (hidden [B, n + 1, H], logits [B, n + 1, V])."""
        _, m, last, table, _ = self._fields(inputs, span, cache)
        n = drafts.shape[1]
        positions = cache.set_step(table, m, m + n + 1, n + 1, span, own_aranges=torch.compiler.is_compiling())
        hidden = self.model.model(torch.cat((last, drafts), 1), positions, cache)
        return hidden, self.model.logits(hidden)

    def _draft(self, seqs, inputs, hidden, n: int, ns, span: int, grammars) -> tuple[torch.Tensor, list]:
        """The drafts [B, n] of a round with each row's processing (row i's own are the first ns[i]), and
        for sampled rows the distributions they were drawn from."""
        qs, advanced = [[] for _ in seqs], [0] * len(seqs)  # advanced: draft tokens each grammar state accepted
        pick = lambda logits, drafts: self._pick(logits, seqs, drafts, qs, grammars, advanced, ns)  # noqa: E731
        drafts = self.draft_chain(inputs, hidden, n, span, self.cache, pick)
        for i, s in enumerate(seqs):  # back to the committed tokens' state
            if advanced[i]:
                s.grammar.rollback(advanced[i])
        return torch.stack(drafts, 1), qs

    def _ids(self, tokens: list[list[int]], width: int) -> torch.Tensor:
        return torch.tensor([row + [0] * (width - len(row)) for row in tokens], device=self.model.device)

    @staticmethod
    def _pick(logits, seqs, drafts, qs, grammars, advanced, ns) -> torch.Tensor:
        """One draft per row with the row's processing (penalties, grammar): greedy rows take the argmax,
        sampled rows draw from q (kept in qs for the verifier); rows past their own count, the argmax."""
        params = [s.params for s in seqs]
        prompts = outputs = None
        if any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params):
            so_far = torch.stack(drafts, 1).tolist() if drafts else [[] for _ in seqs]
            prompts, outputs = [s.prompt for s in seqs], [s.output + dr for s, dr in zip(seqs, so_far)]
        processed = process_logits(logits, params, prompts, outputs)
        if grammars is not None:  # drafts follow the grammar, which advances over them
            processed = grammars.mask(processed, [s.grammar for s in seqs])
        tokens = processed.argmax(-1).tolist()
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy and len(drafts) < ns[i]]
        probs = torch.softmax(processed[sampled], dim=-1) if sampled else None
        for row, i in enumerate(sampled):  # draw the draft from q and hand q to the verifier
            tokens[i] = int(torch.multinomial(probs[row], 1, generator=seqs[i].generator))
            qs[i].append(probs[row])
        for i, s in enumerate(seqs):
            if grammars is not None and s.grammar is not None and not s.grammar.is_terminated():
                advanced[i] += s.grammar.accept_token(tokens[i])
        return torch.tensor(tokens, device=logits.device)

    def _verify(self, seqs, logits, drafts: list[list[int]], qs, grammars):
        """Verification with each row's processing (penalties, sampling, grammars) in one batched pass,
        and the raw logprobs of rows that ask → (results, accepted counts)."""
        if grammars is not None:
            logits = self._mask_targets(logits, seqs, drafts, grammars)
        verdicts = verify_drafts(logits, drafts, [s.params for s in seqs], [s.generator for s in seqs],
                                 [torch.stack(q) if q else None for q in qs], [s.prompt for s in seqs],
                                 [s.output for s in seqs])
        results = []
        for i, (s, res) in enumerate(zip(seqs, verdicts)):
            logprobs = None
            if s.params.logprobs:
                emitted = torch.tensor(res.token_ids, device=logits.device)
                logprobs = gather_logprobs(logits[i, : res.num_accepted + 1], emitted, s.params.top_logprobs)
            results.append((res.token_ids, logprobs))
        return results, [res.num_accepted for res in verdicts]

    @staticmethod
    def _mask_targets(logits: torch.Tensor, seqs, drafts, grammars) -> torch.Tensor:
        """Mask target row j of each constrained sequence with its grammar state after drafts 0..j-1
        (one bitmask, one apply); the states end where they began (the committed tokens)."""
        batch, rows, vocab = logits.shape
        mask = grammars.row_mask(batch * rows)
        for i, s in enumerate(seqs):
            if s.grammar is None:
                continue
            taken = 0
            for j in range(rows):
                mask.fill(i * rows + j, s.grammar)
                if j == len(drafts[i]) or s.grammar.is_terminated() or not s.grammar.accept_token(drafts[i][j]):
                    break  # rows past a refused or final draft are never emitted
                taken += 1
            s.grammar.rollback(taken)
        return mask.apply(logits.reshape(batch * rows, vocab)).view(batch, rows, vocab)
