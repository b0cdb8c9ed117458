"""Per-request sampling: the parameters a request carries, a batched sampler over a [B, V] logits tensor
whose rows belong to different requests, and the acceptance rule for lossless speculative decoding.

Each row is processed in this order (vLLM's and Hugging Face's order):
  1. raw logprobs   log_softmax of the unprocessed logits (what `logprobs` reports, as vLLM does by default)
  2. penalties      repetition (CTRL/HF, over prompt + output), then frequency and presence (OpenAI, output)
  3. temperature    logits / T; T < 1e-5 means greedy (argmax of the penalised logits)
  4. truncation     top-k, then top-p on the top-k renormalised distribution, then min-p (min-p compares
                    each probability with the largest one, a ratio that renormalising does not change)
  5. draw           Gumbel-max with the row's own torch.Generator: argmax(logits + Gumbel noise) is an
                    exact draw from softmax(logits), and the noise for a row comes only from its generator.
Every step is a row-wise tensor op, so a row's token depends only on its own logits, params, history and
generator state: a seeded request gives the same tokens alone or batched with any other requests.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hemat.errors import HematError
from hemat.infer.constraints import Guide

GREEDY_EPS = 1e-5  # temperatures below this are greedy: dividing by them overflows float32 logits
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class SamplingError(HematError):
    """Sampling parameters or inputs hemat cannot sample with; the message names the field and value."""


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0  # [0, 1]; 0 = off
    repetition_penalty: float = 1.0  # [0.01, 100]; 1 = off. Over prompt + output tokens
    presence_penalty: float = 0.0  # [-2, 2]; over output tokens
    frequency_penalty: float = 0.0  # [-2, 2]; over output tokens
    seed: int | None = None  # None: a random seed per request
    max_tokens: int | None = None  # None: up to the context length; 0: score the prompt only
    stop: list[str] = field(default_factory=list)  # a single string is accepted and wrapped
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0  # 0-20 alternatives per token; needs logprobs=True
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob and k alternatives (0-20)
    guide: Guide | None = None  # constrained decoding: what the output must match (constraints.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def validate(self) -> None:
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, low=-1)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        # bounded so that dividing a logit by it cannot overflow float32
        _check_number("repetition_penalty", self.repetition_penalty, low=0.01, high=100.0)
        _check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=0)
        if not isinstance(self.stop, list):
            raise SamplingError(f"stop must be a string or a list of strings, got {self.stop!r}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise SamplingError(f"stop[{i}] must be a non-empty string, got {s!r}")
        if not isinstance(self.stop_token_ids, list):
            raise SamplingError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        for i, t in enumerate(self.stop_token_ids):
            _check_int(f"stop_token_ids[{i}]", t, low=0)
        for name in ("ignore_eos", "logprobs", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_int("n", self.n, low=1)
        _check_int("top_logprobs", self.top_logprobs, low=0, high=MAX_TOP_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise SamplingError(f"top_logprobs={self.top_logprobs} needs logprobs=True")


def _check_number(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise SamplingError(f"{name} must be a number, got {value!r}")
    if value < low or (low_open and value == low):
        raise SamplingError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise SamplingError(f"{name} must be <= {high:g}, got {value!r}")


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise SamplingError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise SamplingError(f"{name} must be <= {high}, got {value!r}")


def stop_token_set(params: SamplingParams, eos_token_ids: Sequence[int]) -> set[int]:
    """Token ids that end the request: its stop_token_ids, plus the model's EOS ids unless ignore_eos."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """The request's own generator, on the device the logits live on (a CUDA draw needs a CUDA generator).
    seed None draws a fresh random seed. For n > 1 choices give choice i the seed `seed + i`."""
    if seed is None:
        seed = secrets.randbits(63)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)  # any Python int: torch accepts only 64-bit seeds
    return generator


# ---- logits processing ---------------------------------------------------------------------------------
History = Sequence[int] | torch.Tensor


def token_counts(histories: Sequence[History], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float counts of each token id in each row's history, built with one scatter."""
    ids = [torch.as_tensor(h, dtype=torch.long).reshape(-1).to(device) for h in histories]
    counts = torch.zeros(len(ids), vocab_size, device=device)
    flat = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device)
    if flat.numel():
        if int(flat.min()) < 0 or int(flat.max()) >= vocab_size:
            raise SamplingError(
                f"token history holds ids outside [0, {vocab_size}): min {int(flat.min())}, max {int(flat.max())}"
            )
        lengths = torch.tensor([len(i) for i in ids], device=device)
        rows = torch.repeat_interleave(torch.arange(len(ids), device=device), lengths)
        counts.index_put_((rows, flat), torch.ones_like(flat, dtype=counts.dtype), accumulate=True)
    return counts


def _row_values(params: Sequence[SamplingParams], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([float(getattr(p, name)) for p in params], dtype=torch.float32, device=device).unsqueeze(1)


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[History] | None = None,
    output_token_ids: Sequence[History] | None = None,
) -> torch.Tensor:
    """Steps 2-4 of the module docstring on [B, V] logits (any float dtype): float32 logits whose softmax is
    the distribution each row samples from, with truncated tokens at -inf. Greedy rows are penalised but
    not scaled or truncated (their argmax is the token). The histories are needed only for penalties."""
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise SamplingError(
            f"logits must be [batch, vocab] with one row per params, got {tuple(logits.shape)} for {len(params)} params"
        )
    batch, vocab = logits.shape
    device = logits.device
    logits = logits.float().clone()

    repetition = any(p.repetition_penalty != 1.0 for p in params)
    additive = any(p.frequency_penalty or p.presence_penalty for p in params)
    if repetition or additive:
        if output_token_ids is None or (repetition and prompt_token_ids is None):
            raise SamplingError("penalties need the token histories: pass prompt_token_ids and output_token_ids")
        for name, hist in (("prompt_token_ids", prompt_token_ids), ("output_token_ids", output_token_ids)):
            if hist is not None and len(hist) != batch:
                raise SamplingError(f"{name} must have one history per row ({batch}), got {len(hist)}")
        output_counts = token_counts(output_token_ids, vocab, device)
        if repetition:
            seen = (token_counts(prompt_token_ids, vocab, device) + output_counts) > 0
            penalty = _row_values(params, "repetition_penalty", device)
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalised, logits)
        if additive:
            frequency = _row_values(params, "frequency_penalty", device)
            presence = _row_values(params, "presence_penalty", device)
            logits = logits - frequency * output_counts - presence * (output_counts > 0).float()

    sampled = torch.tensor([not p.greedy for p in params], device=device).unsqueeze(1)
    temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    logits = logits / temperature.unsqueeze(1)

    use_top_k = any(p.top_k > 0 for p in params)
    use_top_p = any(p.top_p < 1.0 for p in params)
    if use_top_k or use_top_p:
        # one descending sort serves both; stable so that ties break by token id, the same in any batch
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device).clamp(max=vocab)
        remove = torch.arange(vocab, device=device).unsqueeze(0) >= k.unsqueeze(1)
        if use_top_p:
            probs = torch.softmax(sorted_logits.masked_fill(remove, -math.inf), dim=-1)
            mass_before = torch.cumsum(probs, dim=-1) - probs
            top_p = _row_values(params, "top_p", device)
            has_top_p = top_p < 1.0
            remove = remove | (has_top_p & (mass_before >= top_p))
            remove[:, 0] = False  # the most likely token always stays, however small top_p (even 0 in fp32)
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove) & sampled, -math.inf)

    if any(p.min_p > 0 for p in params):
        # p_i >= min_p * p_max  <=>  logit_i - logit_max >= log(min_p); log(0) = -inf keeps every token
        log_min_p = torch.log(_row_values(params, "min_p", device))
        below = logits - logits.max(dim=-1, keepdim=True).values < log_min_p
        logits = logits.masked_fill(below & sampled, -math.inf)
    return logits


# ---- drawing -------------------------------------------------------------------------------------------
def _gumbel_argmax(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One exact draw per row from softmax(logits[i]) using only generators[i] (V uniforms per row)."""
    vocab = logits.shape[-1]
    uniforms = torch.stack([torch.rand(vocab, generator=g, device=logits.device) for g in generators])
    gumbel = -torch.log(-torch.log(uniforms))  # u = 0 gives -inf noise, never +inf: no NaN
    return torch.argmax(logits + gumbel, dim=-1)


def gather_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, num_top: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Raw model logprobs (log_softmax of unprocessed logits) of token_ids [N], and the num_top most likely
    alternatives per row as (ids [N, K], logprobs [N, K]) sorted by logprob, most likely first."""
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
    chosen = logprobs.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    if num_top <= 0:
        return chosen, None, None
    top_lp, top_ids = torch.topk(logprobs, min(num_top, logprobs.shape[-1]), dim=-1, sorted=True)
    return chosen, top_ids, top_lp


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] raw logprob of each chosen token; None when no row asked
    top_token_ids: torch.Tensor | None = None  # [B, K], K = the largest top_logprobs in the batch
    top_logprobs: torch.Tensor | None = None  # [B, K], most likely first

    def alternatives(self, row: int, k: int) -> list[tuple[int, float]]:
        """The row's k most likely tokens as (token id, raw logprob), most likely first."""
        if self.top_token_ids is None or k <= 0:
            return []
        return list(zip(self.top_token_ids[row, :k].tolist(), self.top_logprobs[row, :k].tolist()))


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    prompt_token_ids: Sequence[History] | None = None,
    output_token_ids: Sequence[History] | None = None,
) -> SampleOutput:
    """Pick one token per row of [B, V] logits, each row with its own params and generator (on the
    logits' device). Greedy rows take the argmax and leave their generator untouched. Logprobs are
    computed for every row when any row asks for them."""
    if len(generators) != len(params):
        raise SamplingError(f"sample needs one generator per row: {len(params)} rows, {len(generators)} generators")
    processed = process_logits(logits, params, prompt_token_ids, output_token_ids)
    token_ids = torch.argmax(processed, dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        drawn = _gumbel_argmax(processed[index], [generators[i] for i in sampled_rows])
        token_ids[index] = drawn
    out = SampleOutput(token_ids=token_ids)
    if any(p.logprobs for p in params):
        num_top = max(p.top_logprobs for p in params)
        out.logprobs, out.top_token_ids, out.top_logprobs = gather_logprobs(logits, token_ids, num_top)
    return out


# ---- speculative decoding ------------------------------------------------------------------------------
@dataclass
class SpeculativeResult:
    """num_accepted: how many of the k draft tokens were accepted (0..k). token_ids: the tokens to append,
    always num_accepted + 1 of them: the accepted drafts, then one token from the target model, the
    correction drawn at the first rejection or, when all k were accepted, the bonus token."""

    num_accepted: int
    token_ids: list[int]


def _check_draft(target: torch.Tensor, draft_token_ids: torch.Tensor) -> int:
    k = draft_token_ids.numel()
    if target.dim() != 2 or target.shape[0] != k + 1:
        raise SamplingError(f"the target must be [k+1, vocab] with k+1 = {k + 1} rows, got {tuple(target.shape)}")
    return k


def speculative_accept(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor | Sequence[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator,
) -> SpeculativeResult:
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for one request.
    target_probs [k+1, V]: the target's distributions (after the request's processing) at the k draft
    positions and one past them. draft_token_ids [k] were drawn from draft_probs [k, V]; None means a
    deterministic drafter (one-hot q, e.g. greedy MTP drafts). Draft i is accepted with probability
    min(1, p_i(x)/q_i(x)); at the first rejection a token is drawn from norm(max(0, p_i - q_i)), and when
    all are accepted a bonus token is drawn from p_k. The emitted tokens are distributed exactly as
    sampling from p. Uses k + V uniforms of the request's generator whatever the outcome."""
    draft = torch.as_tensor(draft_token_ids, dtype=torch.long, device=target_probs.device).reshape(-1)
    k = _check_draft(target_probs, draft)
    if draft_probs is not None and draft_probs.shape != (k, target_probs.shape[-1]):
        expected = (k, target_probs.shape[-1])
        raise SamplingError(f"draft_probs must be [k, vocab] = {expected}, got {tuple(draft_probs.shape)}")
    accepted, tokens = speculative_accept_batch(target_probs[None], draft[None], [k],
                                                None if draft_probs is None else draft_probs[None], [generator])
    return SpeculativeResult(accepted[0], draft[: accepted[0]].tolist() + [tokens[0]])


def speculative_accept_batch(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_drafts: Sequence[int],
    draft_probs: torch.Tensor | None,
    generators: Sequence[torch.Generator],
) -> tuple[list[int], list[int]]:
    """speculative_accept for B requests at once: target_probs [B, n+1, V], draft_token_ids [B, n] of which
    row i's own are the first num_drafts[i], draft_probs [B, n, V] or None (one-hot q) → (drafts accepted,
    the token drawn after them) per row. Row i draws exactly what speculative_accept draws alone from
    generators[i] (num_drafts[i] + V uniforms), so a row's outcome does not depend on the others."""
    device = target_probs.device
    target_probs = target_probs.float()
    b, n = draft_token_ids.shape
    own = torch.arange(n, device=device) < torch.tensor(list(num_drafts), device=device)[:, None]
    p_x = target_probs[:, :n].gather(-1, draft_token_ids[..., None])[..., 0]
    q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs.float().gather(-1, draft_token_ids[..., None])[..., 0]
    uniforms = torch.zeros(b, n, device=device)
    for i, (g, k) in enumerate(zip(generators, num_drafts)):
        uniforms[i, :k] = torch.rand(k, generator=g, device=device)
    accept = (uniforms * q_x < p_x) & own  # u < p/q without dividing by 0
    num_accepted = accept.long().cumprod(1).sum(1)
    rows = torch.arange(b, device=device)
    final = target_probs[rows, num_accepted]
    rejected = num_accepted < own.sum(1)
    if bool(rejected.any()):
        at = num_accepted.clamp(max=max(n - 1, 0))
        if draft_probs is None:
            q = torch.nn.functional.one_hot(draft_token_ids[rows, at], final.shape[-1]).float()
        else:
            q = draft_probs.float()[rows, at]
        residual = (final - q).clamp(min=0)
        use = rejected & (residual.sum(-1) > 0)  # p == q up to rounding: fall back to p
        final = torch.where(use[:, None], residual, final)
    tokens = _gumbel_argmax(torch.log(final), generators)
    return num_accepted.tolist(), tokens.tolist()


def speculative_accept_greedy(
    target_logits: torch.Tensor, draft_token_ids: torch.Tensor | Sequence[int]
) -> SpeculativeResult:
    """Greedy verification: a draft token is accepted iff it equals the target's argmax at its position;
    the token after the accepted prefix is the target's argmax there."""
    draft = torch.as_tensor(draft_token_ids, dtype=torch.long, device=target_logits.device).reshape(-1)
    k = _check_draft(target_logits, draft)
    best = torch.argmax(target_logits, dim=-1)
    num_accepted = int(torch.cumprod((best[:k] == draft).long(), 0).sum()) if k else 0
    return SpeculativeResult(num_accepted, draft[:num_accepted].tolist() + [int(best[num_accepted])])


def verify_drafts(
    logits: torch.Tensor,
    draft_token_ids: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    draft_probs: Sequence[torch.Tensor | None],
    prompt_token_ids: Sequence[History],
    output_token_ids: Sequence[History],
) -> list[SpeculativeResult]:
    """Verify the drafts of B requests from the target's raw logits [B, n+1, V] in one pass: row i holds
    len(draft_token_ids[i]) <= n drafts, drawn from draft_probs[i] [k_i, V] (None: deterministic drafts).
    Target row j of request i is processed with its params as if its drafts 0..j-1 were already output
    (so penalties see them), then accepted greedily (the argmax) or by rejection sampling. Raw logprobs
    of the emitted tokens: gather_logprobs."""
    b, rows, vocab = logits.shape
    n, device = rows - 1, logits.device
    lengths = [len(d) for d in draft_token_ids]
    drafts = torch.tensor([list(d) + [0] * (n - len(d)) for d in draft_token_ids], dtype=torch.long,
                          device=device).view(b, n)
    penalised = any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params)
    prompts = outputs = None
    if penalised:  # each row's history grows by the drafts before it
        prompts = [prompt_token_ids[i] for i in range(b) for _ in range(rows)]
        outputs = [[int(t) for t in torch.as_tensor(output_token_ids[i], dtype=torch.long).reshape(-1).tolist()]
                   + list(draft_token_ids[i][:j]) for i in range(b) for j in range(rows)]
    processed = process_logits(logits.reshape(b * rows, vocab), [p for p in params for _ in range(rows)],
                               prompts, outputs).view(b, rows, vocab)
    best = processed.argmax(-1)
    own = torch.arange(n, device=device) < torch.tensor(lengths, device=device)[:, None]
    accepted = ((best[:, :n] == drafts) & own).long().cumprod(1).sum(1).tolist()
    tokens = [best[i, a] for i, a in enumerate(accepted)]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=device)
        q = None
        if any(draft_probs[i] is not None for i in sampled):
            q = torch.zeros(len(sampled), n, vocab, device=device)
            for row, i in enumerate(sampled):
                probs = draft_probs[i]
                if probs is None:
                    probs = torch.nn.functional.one_hot(drafts[i, : lengths[i]], vocab)
                elif probs.shape != (lengths[i], vocab):
                    raise SamplingError(f"draft_probs[{i}] must be [k, vocab] = {(lengths[i], vocab)}, "
                                        f"got {tuple(probs.shape)}")
                q[row, : lengths[i]] = probs
        counts, drawn = speculative_accept_batch(torch.softmax(processed[index], dim=-1), drafts[index],
                                                 [lengths[i] for i in sampled], q, [generators[i] for i in sampled])
        for i, a, token in zip(sampled, counts, drawn):
            accepted[i], tokens[i] = a, token
    return [SpeculativeResult(a, list(d[:a]) + [int(t)]) for a, d, t in zip(accepted, draft_token_ids, tokens)]


def verify_draft(
    logits: torch.Tensor,
    draft_token_ids: Sequence[int],
    params: SamplingParams,
    generator: torch.Generator,
    draft_probs: torch.Tensor | None = None,
    prompt_token_ids: History = (),
    output_token_ids: History = (),
) -> SpeculativeResult:
    """verify_drafts for one request: target logits [k+1, V]."""
    draft = [int(t) for t in draft_token_ids]
    _check_draft(logits, torch.tensor(draft, dtype=torch.long))
    return verify_drafts(logits[None], [draft], [params], [generator], [draft_probs], [prompt_token_ids],
                         [output_token_ids])[0]
