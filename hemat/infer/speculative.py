"""Speculative decoding with the checkpoint's own multi-token-prediction modules (DeepSeek-V3 §2.2, §5.4.3).

Notation for one sequence: x_0..x_m are its tokens so far; x_m (just sampled) is not in the main cache
yet; h_j is the main model's final normalised hidden state at position j (it predicted x_{j+1}).
MTP depth k (1..D) at position j reads h^{k-1}_j (h^0 = h) and the embedding of x_{j+k}, attends over
its own cache (layer num_hidden_layers + k - 1) and predicts x_{j+k+1}.

One round:
  1. draft: every depth runs over positions [mtp_start, m-1]; the output of depth k at m - 1 is draft
     d_k (a guess for x_{m+k}). Tokens past x_m fed to deeper depths are the drafts themselves.
  2. verify: one main-model forward over [x_m, d_1..d_D] at positions m..m+D gives the target
     distributions at D + 1 positions; sampling.verify_draft accepts a prefix of a drafts (greedy:
     equal to the argmax; sampling: Leviathan-Chen rejection sampling, exact in distribution) and
     adds one token of its own. The cache then holds positions up to m + a; rejected entries past it
     are simply overwritten later.
Entries of depth k at positions j <= m - k were computed from committed tokens only; the later ones
read drafts, so the next round recomputes every depth from mtp_start = m - D + 1. The sequence keeps
the main hidden states from mtp_start on for that (D rows; one for DeepSeek-V3's single depth)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hemat.infer.sampling import gather_logprobs, process_logits, verify_draft


class MTPDrafter:
    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.depth = len(model.mtp_layers)
        self.drafted = self.accepted = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

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
            self._run(
                [seqs[i] for i in rows], [starts[i] for i in rows], ends,
                [hidden[i, : e - starts[i]] for i, e in zip(rows, ends)],
                [list(seqs[i].prompt[starts[i] + 1 : e + d]) for i, e in zip(rows, ends)], draft=False,
            )

    def step(self, seqs: Sequence, grow: Callable, grammars=None) -> list[tuple[list[int], list | None]]:
        """One draft-and-verify round for every sequence → per sequence (emitted tokens, raw logprobs
        as (logprob, top ids, top logprobs) tensors or None). grammars (constraints.Grammars): masks the
        drafts and target rows of sequences with a grammar state (`s.grammar`)."""
        d = self.depth
        ms = [s.num_cached for s in seqs]
        tokens = [s.tokens(s.mtp_start + 1, m + 1) for s, m in zip(seqs, ms)]
        drafts, qs = self._run(seqs, [s.mtp_start for s in seqs], ms, [s.hidden for s in seqs], tokens, draft=True,
                               grammars=grammars)

        for s, m in zip(seqs, ms):
            grow(s, m + d + 1)
        ids = torch.tensor([[s.output[-1]] + dr for s, dr in zip(seqs, drafts)], device=self.model.device)
        positions = self.cache.begin_step([s.pages for s in seqs], ms, [d + 1] * len(seqs))
        hidden = self.model.model(ids, positions, self.cache)
        logits = self.model.logits(hidden)  # [B, D + 1, V]
        if grammars is not None:
            logits = self._mask_targets(logits, seqs, drafts, grammars)

        results = []
        for i, (s, m) in enumerate(zip(seqs, ms)):
            draft_probs = torch.stack(qs[i]) if qs[i] else None
            res = verify_draft(logits[i], drafts[i], s.params, s.generator, draft_probs, s.prompt, s.output)
            a = res.num_accepted
            self.drafted += d
            self.accepted += a
            s.num_cached = m + a + 1
            s.hidden = torch.cat((s.hidden[len(s.hidden) - (d - 1) :] if d > 1 else s.hidden[:0], hidden[i, : a + 1]))
            s.mtp_start = m - d + 1
            logprobs = None
            if s.params.logprobs:
                emitted = torch.tensor(res.token_ids, device=logits.device)
                logprobs = gather_logprobs(logits[i, : a + 1], emitted, s.params.top_logprobs)
            results.append((res.token_ids, logprobs))
        return results

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

    def _run(self, seqs, starts, ends, hiddens, tokens, draft: bool, grammars=None):
        """Every depth over positions [starts[i], ends[i]) of each row. tokens[i] lists x_{start+1}...;
        depth k (0-based) reads tokens[i][k : k + T_i], and each depth's draft is appended to it."""
        model, b = self.model, len(seqs)
        lengths = [e - s for s, e in zip(starts, ends)]
        t = max(lengths)
        positions = self.cache.begin_step([s.pages for s in seqs], starts, lengths)
        rope = model.model.rotary_emb(positions)
        hidden = hiddens[0].new_zeros(b, t, hiddens[0].shape[-1])
        for i, h in enumerate(hiddens):
            hidden[i, : len(h)] = h
        last = torch.tensor(lengths, device=hidden.device) - 1
        rows = torch.arange(b, device=hidden.device)
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        advanced = [0] * len(seqs)  # draft tokens each grammar state accepted
        for k, layer in enumerate(model.mtp_layers):
            ids = torch.tensor([tok[k : k + n] + [0] * (t - n) for tok, n in zip(tokens, lengths)], device=hidden.device)
            hidden = layer(hidden, model.model.embed_tokens(ids), rope, self.cache)
            if not draft:
                continue
            logits = model.logits(layer.shared_head.norm(hidden[rows, last]))
            processed = process_logits(
                logits, [s.params for s in seqs], [s.prompt for s in seqs], [s.output + dr for s, dr in zip(seqs, drafts)]
            )
            if grammars is not None:  # drafts follow the grammar, which advances over them
                processed = grammars.mask(processed, [s.grammar for s in seqs])
            for i, s in enumerate(seqs):
                if s.params.greedy:
                    token = int(processed[i].argmax())
                else:  # draw the draft from q and hand q to the verifier
                    q = torch.softmax(processed[i], dim=-1)
                    token = int(torch.multinomial(q, 1, generator=s.generator))
                    qs[i].append(q)
                drafts[i].append(token)
                tokens[i].append(token)
                if grammars is not None and s.grammar is not None and not s.grammar.is_terminated():
                    advanced[i] += s.grammar.accept_token(token)
        for i, s in enumerate(seqs):  # back to the committed tokens' state
            if advanced[i]:
                s.grammar.rollback(advanced[i])
        return drafts, qs
