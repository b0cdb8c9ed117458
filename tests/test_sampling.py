"""Sampling, speculative acceptance, stop strings and reasoning splitting: real tensors, seeded, tiny."""

import math
import random

import pytest
import torch

from hemat.errors import HematError
from hemat.infer.reasoning import ReasoningSplitter, split_reasoning
from hemat.infer.sampling import (
    SamplingError,
    SamplingParams,
    gather_logprobs,
    make_generator,
    process_logits,
    sample,
    speculative_accept,
    speculative_accept_greedy,
    stop_token_set,
    verify_draft,
)
from hemat.infer.stops import StopMatcher


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_DF4_P001 = 18.47  # chi-square critical value, 4 degrees of freedom, p = 0.001


# ---- params ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -1, "temperature must be >= 0, got -1"),
        ("temperature", float("nan"), "temperature must be a number"),
        ("top_p", 0.0, "top_p must be > 0, got 0.0"),
        ("top_p", 1.5, "top_p must be <= 1, got 1.5"),
        ("top_k", -2, "top_k must be >= -1, got -2"),
        ("top_k", 2.5, "top_k must be an integer, got 2.5"),
        ("min_p", 1.1, "min_p must be <= 1, got 1.1"),
        ("repetition_penalty", 0.0, "repetition_penalty must be >= 0.01, got 0.0"),
        ("presence_penalty", 2.5, "presence_penalty must be <= 2, got 2.5"),
        ("frequency_penalty", -3, "frequency_penalty must be >= -2, got -3"),
        ("seed", "7", "seed must be an integer, got '7'"),
        ("max_tokens", -1, "max_tokens must be >= 0, got -1"),
        ("prompt_logprobs", 21, "prompt_logprobs must be <= 20, got 21"),
        ("stop", ["ok", ""], "stop[1] must be a non-empty string, got ''"),
        ("stop_token_ids", [3, -1], "stop_token_ids[1] must be >= 0, got -1"),
        ("ignore_eos", 1, "ignore_eos must be true or false, got 1"),
        ("n", 0, "n must be >= 1, got 0"),
        ("top_logprobs", 21, "top_logprobs must be <= 20, got 21"),
    ],
)
def test_validation_names_field_and_value(field, value, message):
    with pytest.raises(SamplingError) as err:
        SamplingParams(**{field: value, "logprobs": field == "top_logprobs"})
    assert message in str(err.value)
    assert isinstance(err.value, HematError)


def test_params_defaults_and_normalisation():
    p = SamplingParams(stop="END", temperature=0)
    assert p.stop == ["END"] and p.greedy and p.max_tokens is None
    with pytest.raises(SamplingError, match="top_logprobs=3 needs logprobs=True"):
        SamplingParams(top_logprobs=3)
    assert stop_token_set(SamplingParams(stop_token_ids=[7]), [1]) == {1, 7}
    assert stop_token_set(SamplingParams(stop_token_ids=[7], ignore_eos=True), [1]) == {7}


# ---- logits processing ----------------------------------------------------------------------------------
def test_greedy_is_argmax_and_leaves_generator_untouched():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    gens = [make_generator(i) for i in range(6)]
    before = [g.get_state() for g in gens]
    out = sample(logits, [SamplingParams(temperature=0)] * 6, gens)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, before))


def test_truncation_masks_keep_exactly_the_expected_tokens():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.2, 0.1])  # by rank: 1 (.5), 3 (.2), 0 (.15), 4 (.1), 2 (.05)
    logits = torch.log(probs).repeat(8, 1) * 3.0  # scaled: temperature 3 restores probs
    params = [
        SamplingParams(temperature=3, top_k=2),
        SamplingParams(temperature=3, top_k=-1),
        SamplingParams(temperature=3, top_p=0.6),  # mass before: .5 (keep 3), .7 (drop 0)
        SamplingParams(temperature=3, top_p=0.45),  # only the first token
        SamplingParams(temperature=3, min_p=0.35),  # threshold .175
        SamplingParams(temperature=3, min_p=0.25),  # threshold .125
        SamplingParams(temperature=3, top_k=3, top_p=0.75),  # top-3 renormalised: .588, .235, .176
        SamplingParams(temperature=0, top_k=1, min_p=0.9),  # greedy rows are never truncated
    ]
    out = process_logits(logits, params)
    assert [kept(r) for r in out] == [{1, 3}, {0, 1, 2, 3, 4}, {1, 3}, {1}, {1, 3}, {0, 1, 3}, {1, 3}, {0, 1, 2, 3, 4}]
    # kept tokens keep their temperature-scaled logits
    assert torch.allclose(out[0, [1, 3]], torch.log(probs[[1, 3]]))
    # sampling only ever picks kept tokens
    gens = [make_generator(s) for s in range(8)]
    for _ in range(20):
        tokens = sample(logits, params, gens).token_ids.tolist()
        assert all(t in kept(r) for t, r in zip(tokens, out))


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=1.0)]
    out = process_logits(logits, params, prompt_token_ids=[[0]], output_token_ids=[[1, 1, 2]])
    # repetition (seen 0, 1, 2): 2/2=1, -1*2=-2, .5/2=.25; then output counts {1: 2, 2: 1}:
    # token 1: -2 - .5*2 - 1 = -4, token 2: .25 - .5*1 - 1 = -1.25; tokens 3, 4 unseen
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, -1.25, 3.0, 1.0]]))
    # the prompt counts for the repetition penalty only; temperature divides after the penalties
    out = process_logits(
        logits, [SamplingParams(frequency_penalty=1.0, temperature=2.0)], prompt_token_ids=[[3]], output_token_ids=[[4]]
    )
    assert torch.allclose(out, torch.tensor([[1.0, -0.5, 0.25, 1.5, 0.0]]))
    with pytest.raises(SamplingError, match="histories"):
        process_logits(logits, params)
    with pytest.raises(SamplingError, match="outside"):
        process_logits(logits, params, prompt_token_ids=[[9]], output_token_ids=[[]])


def test_sampling_follows_the_processed_distribution():
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    n = 3000
    top2 = torch.tensor([1.0, 0, 0, math.e, 0]) / (1 + math.e)  # e^1 : e^2, the rest truncated
    cases = [(SamplingParams(temperature=0.7), torch.softmax(logits / 0.7, -1)), (SamplingParams(top_k=2), top2)]
    for params, expected in cases:
        gens = [make_generator(1000 + i) for i in range(n)]
        tokens = sample(logits.repeat(n, 1), [params] * n, gens).token_ids
        counts = torch.bincount(tokens, minlength=5).float()
        support = expected > 0
        assert counts[~support].sum() == 0
        assert chi_square(counts[support], expected[support]) < CHI2_DF4_P001


# ---- reproducibility ------------------------------------------------------------------------------------
def test_seeded_row_is_the_same_alone_and_in_a_batch():
    vocab, steps = 40, 12
    data = torch.Generator().manual_seed(5)
    mine = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.4, seed=123,
                          logprobs=True, top_logprobs=3)
    others = [
        SamplingParams(temperature=1.3, top_k=5, seed=9),
        SamplingParams(temperature=0),
        SamplingParams(min_p=0.2, presence_penalty=-1.0),
        SamplingParams(temperature=0.5, top_k=3, top_p=0.5, seed=4, logprobs=True, top_logprobs=5),
    ]
    alone_gen = make_generator(mine.seed)
    batch_gens = [make_generator(p.seed) for p in others]
    batch_gens.insert(2, make_generator(mine.seed))
    batch_params = others[:2] + [mine] + others[2:]
    prompts = [torch.randint(0, vocab, (n,), generator=data).tolist() for n in (3, 5, 4, 1, 6)]
    outputs: list[list[int]] = [[] for _ in range(5)]
    alone_tokens, alone_output = [], []
    for _ in range(steps):
        logits = torch.randn(5, vocab, generator=data) * 3
        batch = sample(logits, batch_params, batch_gens, prompts, outputs)
        alone = sample(logits[2:3], [mine], [alone_gen], [prompts[2]], [alone_output])
        assert batch.token_ids[2] == alone.token_ids[0]
        assert batch.logprobs[2] == alone.logprobs[0]
        assert batch.alternatives(2, 3) == alone.alternatives(0, 3)
        for row, t in enumerate(batch.token_ids.tolist()):
            outputs[row].append(t)
        alone_output.append(int(alone.token_ids[0]))
        alone_tokens.append(int(alone.token_ids[0]))
    assert alone_tokens == outputs[2]
    assert len(set(alone_tokens)) > 1  # really sampled, not stuck on one token
    # the same seed in a fresh generator replays the whole sequence
    replay_gen, replay_out = make_generator(123), []
    data = torch.Generator().manual_seed(5)
    [torch.randint(0, vocab, (n,), generator=data) for n in (3, 5, 4, 1, 6)]
    for _ in range(steps):
        logits = torch.randn(5, vocab, generator=data) * 3
        replay_out.append(int(sample(logits[2:3], [mine], [replay_gen], [prompts[2]], [replay_out]).token_ids[0]))
    assert replay_out == alone_tokens


def test_different_seeds_differ():
    logits = torch.zeros(1, 100)
    runs = []
    for seed in (1, 2):
        g = make_generator(seed)
        runs.append([int(sample(logits, [SamplingParams(seed=seed)], [g]).token_ids[0]) for _ in range(20)])
    assert runs[0] != runs[1]
    unseeded = [make_generator(None) for _ in range(2)]
    draws = [[int(sample(logits, [SamplingParams()], [g]).token_ids[0]) for _ in range(20)] for g in unseeded]
    assert draws[0] != draws[1]


def test_logprobs_are_raw_model_logprobs_sorted():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0], [3.0, 0.0, -0.5, 1.0]])
    params = [SamplingParams(temperature=0.2, top_k=1, repetition_penalty=1.5, logprobs=True, top_logprobs=2),
              SamplingParams(temperature=0, logprobs=True, top_logprobs=4)]
    out = sample(logits, params, [make_generator(0), make_generator(1)], [[1], []], [[], []])
    raw = torch.log_softmax(logits, -1)
    assert out.token_ids.tolist() == [1, 0]
    assert torch.allclose(out.logprobs, raw[[0, 1], [1, 0]])
    assert [t for t, _ in out.alternatives(0, 2)] == [1, 3]
    alts = out.alternatives(1, 4)
    assert [t for t, _ in alts] == [0, 3, 1, 2] and all(a[1] >= b[1] for a, b in zip(alts, alts[1:]))
    assert math.isclose(alts[1][1], float(raw[1, 3]), rel_tol=1e-6)
    assert sample(logits, [SamplingParams()] * 2, [make_generator(0), make_generator(1)]).logprobs is None


# ---- speculative decoding -------------------------------------------------------------------------------
def test_speculative_accept_preserves_the_target_distribution():
    p = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05], [0.1, 0.5, 0.1, 0.2, 0.1], [0.05, 0.05, 0.3, 0.3, 0.3]])
    q = torch.tensor([[0.05, 0.1, 0.15, 0.3, 0.4], [0.2, 0.2, 0.2, 0.2, 0.2]])
    gen, draft_gen = make_generator(11), torch.Generator().manual_seed(12)
    trials = 6000
    drafts = torch.stack([torch.multinomial(q[i], trials, replacement=True, generator=draft_gen) for i in range(2)], 1)
    counts = torch.zeros(3, 5)
    accepted_first = 0
    for draft in drafts:
        result = speculative_accept(p, draft, q, gen)
        assert len(result.token_ids) == result.num_accepted + 1
        assert result.token_ids[: result.num_accepted] == draft[: result.num_accepted].tolist()
        accepted_first += result.num_accepted >= 1
        for position, token in enumerate(result.token_ids):
            counts[position, token] += 1
    for position in range(3):  # each position's tokens follow p, not q
        assert chi_square(counts[position], p[position]) < CHI2_DF4_P001
    assert chi_square(counts[0], q[0]) > 1000
    # acceptance rate of the first draft = sum_x min(p, q)
    assert abs(accepted_first / trials - float(torch.minimum(p[0], q[0]).sum())) < 0.03


def test_speculative_accept_with_deterministic_drafts():
    p = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05], [0.2] * 5])
    gen = make_generator(3)
    counts = torch.zeros(5)
    for _ in range(3000):
        result = speculative_accept(p, [4], None, gen)  # always drafts the least likely token
        counts[result.token_ids[0]] += 1
    assert chi_square(counts, p[0]) < CHI2_DF4_P001
    with pytest.raises(SamplingError, match="k\\+1"):
        speculative_accept(p, [1, 2], None, gen)


def test_greedy_speculative_accepts_matching_prefix():
    logits = torch.full((3, 6), -1.0)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = 5.0
    assert speculative_accept_greedy(logits, [2, 3]).token_ids == [2, 4]
    assert speculative_accept_greedy(logits, [2, 4]).num_accepted == 2
    assert speculative_accept_greedy(logits, [2, 4]).token_ids == [2, 4, 1]
    assert speculative_accept_greedy(logits, [0, 4]).token_ids == [2]


def test_verify_draft_penalises_with_earlier_drafts_in_the_history():
    logits = torch.tensor([[1.0, 0.5, 0.0, 0.0]]).repeat(3, 1)
    params = SamplingParams(temperature=0, frequency_penalty=2.0)
    result = verify_draft(logits, [0, 0], params, make_generator(0))
    # row 0 has no history: argmax 0 accepts draft 0; row 1 has seen one 0 (penalised to -1): argmax 1
    assert result.num_accepted == 1 and result.token_ids == [0, 1]
    chosen, _, _ = gather_logprobs(logits[:2], torch.tensor(result.token_ids))
    assert torch.allclose(chosen, torch.log_softmax(logits[:2], -1)[[0, 1], [0, 1]])
    sampled = verify_draft(logits, [0, 1], SamplingParams(seed=1), make_generator(1))
    assert len(sampled.token_ids) == sampled.num_accepted + 1


# ---- stop strings ---------------------------------------------------------------------------------------
def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    emitted, stopped = "", False
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        emitted += text
        if stopped:
            break
    return emitted + matcher.flush(), stopped


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize(
    "stops, text, expected, stopped",
    [
        (["STOP"], "hello STOP world", "hello ", True),
        (["ab", "abc"], "xaabcd", "xa", True),
        (["abc", "b"], "xabc", "xa", True),  # "b" is complete first
        (["END"], "no stop here, EN", "no stop here, EN", False),  # held tail released by flush
        (["\n\n"], "line\nnext\n\nafter", "line\nnext", True),
        (["。", "終わり"], "こんにちは🙂終わ", "こんにちは🙂終わ", False),
        (["。", "終わり"], "🙂🙂終わり。x", "🙂🙂", True),
        ([], "anything", "anything", False),
    ],
)
def test_stop_matcher_is_independent_of_how_text_is_split(stops, text, expected, stopped):
    rng = random.Random(0)
    splits = [[text], list(text)] + [random_split(text, rng) for _ in range(20)]
    for pieces in splits:
        assert feed_all(StopMatcher(stops), pieces) == (expected, stopped), pieces


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["ab", "abc"])
    assert m.feed("xa") == ("x", False)  # "a" might start a stop string
    assert m.feed("a") == ("a", False)  # the first "a" is now safe
    assert m.feed("b") == ("", True)  # "ab" completes: nothing of it is emitted
    assert m.feed("more") == ("", True) and m.flush() == ""
    m = StopMatcher(["</answer>"])
    assert m.feed("42</ans") == ("42", False)
    assert m.feed("wer") == ("", False)
    assert m.feed("!") == ("</answer!", False)
    with pytest.raises(HematError, match="stop\\[0\\]"):
        StopMatcher([""])


# ---- reasoning ------------------------------------------------------------------------------------------
def stream(splitter: ReasoningSplitter, pieces: list[str]) -> tuple[str, str]:
    parts = [part for piece in pieces for part in splitter.feed(piece)] + splitter.flush()
    assert all(text for _, text in parts)
    return "".join(t for k, t in parts if k == "reasoning"), "".join(t for k, t in parts if k == "content")


@pytest.mark.parametrize(
    "text, starts_in_reasoning, expected",
    [
        ("<think>\nadd 2 and 3\n</think>\n\nThe answer is 5.", False, ("\nadd 2 and 3\n", "The answer is 5.")),
        ("\n<think>x</think>y", False, ("x", "y")),
        ("no tags at all </think>", False, (None, "no tags at all </think>")),
        ("  <thinking> is a word", False, (None, "  <thinking> is a word")),
        ("already thinking</think>  done <think>not again</think>", True,
         ("already thinking", "done <think>not again</think>")),
        ("<think>cut off mid-thou", False, ("cut off mid-thou", "")),
        ("<think></think>", False, ("", "")),
        ("思考🙂</think>\n答案", True, ("思考🙂", "答案")),
        ("<th", False, (None, "<th")),
    ],
)
def test_reasoning_split_streaming_and_whole(text, starts_in_reasoning, expected):
    assert split_reasoning(text, starts_in_reasoning=starts_in_reasoning) == expected
    rng = random.Random(1)
    for pieces in [list(text)] + [random_split(text, rng) for _ in range(20)]:
        reasoning, content = stream(ReasoningSplitter(starts_in_reasoning=starts_in_reasoning), pieces)
        assert (reasoning, content) == (expected[0] or "", expected[1]), pieces


def test_reasoning_splitter_emits_as_soon_as_safe():
    s = ReasoningSplitter()
    assert s.feed("<thi") == []
    assert s.feed("nk>plan") == [("reasoning", "plan")]
    assert s.feed(" more</th") == [("reasoning", " more")]
    assert s.feed("ink>\n") == []
    assert s.feed("\nAnswer") == [("content", "Answer")]
    assert s.flush() == []
    custom = ReasoningSplitter(start="[R]", end="[/R]")
    assert custom.feed("[R]a[/R]b") == [("reasoning", "a"), ("content", "b")]


def test_a_vanishing_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    params = [SamplingParams(temperature=1.0, top_p=5e-324)]
    out = sample(logits, params, [make_generator(0)])
    assert out.token_ids.tolist() == [1]
