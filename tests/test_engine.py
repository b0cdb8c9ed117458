"""The inference engine on tiny random models: paged-cache exactness, continuous batching, sampling,
prefix reuse, MTP speculative decoding, text handling (stops, reasoning, streaming), CLI, bad input."""

import copy
import itertools
import math

import pytest
import torch

from hemat.cli import main
from hemat.errors import HematError
from hemat.infer.cache import PagedCache
from hemat.infer.engine import Engine, EngineRequestError
from hemat.infer.sampling import SamplingError, SamplingParams
from hemat.infer import speculative
from hemat.infer.speculative import ChainLength, DraftGate
from hemat.model.config import ModelConfig
from hemat.model.transformer import CausalLM
from hemat.tokenizer import train_tokenizer

VOCAB = 96
GREEDY = dict(temperature=0.0, ignore_eos=True)


def tiny_config(kind: str, **overrides) -> ModelConfig:
    if kind in ("deepseek_v3", "deepseek_v2"):
        base = dict(
            model_type=kind, vocab_size=VOCAB, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=3, n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
            n_group=2, topk_group=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, first_k_dense_replace=1, num_nextn_predict_layers=int(kind == "deepseek_v3"),
            max_position_embeddings=128,
            initializer_range=0.2,
        )
    else:
        base = dict(model_type=kind, vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    initializer_range=0.2, tie_word_embeddings=kind == "qwen2")
    return ModelConfig(**{**base, **overrides})


def tiny_model(kind: str, seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(tiny_config(kind, **overrides)).eval()
    if kind == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(std=0.2)
    return model


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def naive_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by a full uncached forward per token: the reference."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-steps:]


def tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


# ---- the paged cache --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["deepseek_v3", "deepseek_v2", "llama", "qwen2", "qwen3"])
def test_paged_cache_matches_full_forward_for_a_ragged_batch(kind):
    model = tiny_model(kind)
    config = model.config
    cache = PagedCache(config, num_pages=40, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    seqs = [prompt(n, seed=n) for n in (16, 15, 9)]
    tables = [[1 + i + 3 * j for j in range(7)] for i in range(3)]  # interleaved, non-contiguous pages
    # chunks per row: a ragged prefill, a ragged multi-token step, then single-token decode steps
    schedule = [[6, 3, 9], [5, 4, 0], [1, 2, 0]] + [[1, 1, 0]] * 4 + [[0, 1, 0]] * 2
    done, got = [0, 0, 0], [[], [], []]
    with torch.no_grad():
        for chunk in schedule:
            rows = [i for i in range(3) if chunk[i]]
            width = max(chunk)
            ids = torch.tensor([seqs[i][done[i] : done[i] + chunk[i]] + [0] * (width - chunk[i]) for i in rows])
            positions = cache.begin_step([tables[i] for i in rows], [done[i] for i in rows], [chunk[i] for i in rows])
            logits = model(ids, positions=positions, cache=cache)
            for r, i in enumerate(rows):
                got[i].append(logits[r, : chunk[i]])
                done[i] += chunk[i]
        for i, seq in enumerate(seqs):
            full = model(torch.tensor([seq[: done[i]]]))[0]
            assert (torch.cat(got[i]) - full).abs().max().item() <= 1e-4
    if kind == "deepseek_v3":  # only the normalised latent and the RoPE key are stored
        (store,) = cache.stores[0]
        assert store.shape[1:] == (config.kv_lora_rank + config.qk_rope_head_dim,)
        assert cache.bytes_per_token == (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * 4


# ---- greedy generation --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, speculative", [("deepseek_v3", "off"), ("deepseek_v3", "auto"), ("llama", "off"),
                                               ("qwen2", "off"), ("deepseek_v2", "off"), ("qwen3", "off")])
def test_batched_greedy_generation_equals_uncached_greedy(kind, speculative):
    model = tiny_model(kind)
    engine = Engine(model, max_batch_size=4, page_size=4, speculative=speculative)
    prompts = [prompt(n, seed=n) for n in (3, 17, 8, 30, 11)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == naive_greedy(model, p, 12)
        assert out.outputs[0].finish_reason == "length"
    stats = engine.stats()
    assert stats["pages_free"] == stats["pages_total"] and stats["running"] == stats["waiting"] == 0
    if speculative == "auto":
        assert stats["speculative_depth"] == 1 and stats["spec_drafted"] > 0
        assert 0.0 <= stats["spec_acceptance_rate"] <= 1.0


def test_mtp_drafts_are_what_the_mtp_module_predicts_over_the_full_sequence():
    model = tiny_model("deepseek_v3")
    engine = Engine(model, page_size=4, max_prefill_tokens=5, speculative="mtp")  # prompts prefill in chunks
    rounds = []
    draft_chain = engine.drafter.draft_chain

    def recording_draft_chain(inputs, *args):
        drafts = draft_chain(inputs, *args)
        ms = inputs[:, 1].tolist()  # the rows of _round_inputs start with [mtp_start, m, ...]
        rounds.extend((s, m, d) for s, m, d in zip(engine.running, ms, drafts[0].tolist()))
        return drafts

    engine.drafter.draft_chain = recording_draft_chain
    prompts = [prompt(9, seed=1), prompt(14, seed=2)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, **GREEDY))
    assert len(rounds) >= 10
    for seq, m, draft in rounds:
        ids = torch.tensor([(seq.prompt + seq.output)[: m + 1]])
        with torch.no_grad():
            _, mtp = model(ids, return_mtp=True)
        assert draft == int(mtp[0][0, m - 1].argmax())  # depth 1 at position m - 1 predicts token m + 1
    assert [o.outputs[0].token_ids for o in outs] == [naive_greedy(model, p, 10) for p in prompts]


def mostly_bigram(model: CausalLM, scale: float) -> CausalLM:
    """Shrink what every layer adds to the residual stream by `scale` and let each MTP depth read only the
    next token's embedding: the MTP module then predicts nearly what the main model will (exactly, at
    scale 0), so long chains of drafts are accepted, while the context still matters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                param.mul_(scale)
        hidden = model.config.hidden_size
        for layer in model.mtp_layers:
            layer.eh_proj.weight.copy_(torch.cat((torch.eye(hidden), torch.zeros(hidden, hidden)), dim=1))
    return model


@pytest.mark.parametrize("depth, draft_tokens", [(1, 1), (1, 2), (1, 3), (2, 1), (2, 3), (1, "auto")])
def test_chained_mtp_drafts_keep_greedy_output_token_identical(depth, draft_tokens):
    """k drafts per round, chained past the MTP depth on the module's own output: whatever is accepted,
    the output is plain greedy decoding's."""
    model = mostly_bigram(tiny_model("deepseek_v3", seed=1, num_nextn_predict_layers=depth), scale=0.01)
    engine = Engine(model, max_batch_size=3, page_size=4, speculative="mtp", num_speculative_tokens=draft_tokens)
    prompts = [prompt(n, seed=n) for n in (3, 9, 6, 13)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=15, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == [naive_greedy(model, p, 15) for p in prompts]
    stats = engine.stats()
    assert stats["pages_free"] == stats["pages_total"]
    assert stats["spec_rounds"] > 0
    if draft_tokens != "auto":
        assert stats["spec_drafted"] == draft_tokens * stats["spec_rounds"]
    # some rounds accepted more than one draft, some fewer than all: every path was taken
    assert stats["spec_rounds"] < stats["spec_accepted"] < stats["spec_drafted"] or draft_tokens == 1


@pytest.mark.parametrize("draft_rate, plain_rate", [(300.0, 100.0), (100.0, 300.0)])
def test_draft_gate_runs_the_faster_mode_and_retries_the_slower_ever_less_often(draft_rate, plain_rate):
    gate, runs = DraftGate(), []
    for _ in range(1000):
        drafts = gate.drafts(3)  # bucket 4
        runs.append(drafts)
        gate.record(3, drafts, seconds=0.01, tokens=(draft_rate if drafts else plain_rate) * 0.01)
    faster = draft_rate > plain_rate
    warm = 2 * (gate.WARM + gate.SAMPLES)
    assert runs[:warm] == [True] * (warm // 2) + [False] * (warm // 2)  # each mode measured first
    retries = [i for i in range(warm, len(runs)) if runs[i] != faster and runs[i - 1] == faster]
    assert all(runs[i : i + gate.SAMPLES] == [not faster] * gate.SAMPLES for i in retries)  # SAMPLES steps each
    gaps = [b - a for a, b in zip(retries, retries[1:])]
    assert gaps[:3] == [gate.SAMPLES + gate.RETRY * 2**i for i in (1, 2, 3)]  # the slower, ever less often
    assert len(retries) < 8 and set(gate.buckets) == {4}


def test_draft_gate_switches_when_the_slower_mode_becomes_faster():
    gate, runs = DraftGate(), []
    for step in range(400):
        drafts = gate.drafts(1)
        runs.append(drafts)
        round_seconds = 0.02 if step < 100 else 0.005  # 2 tokens a round: the drafts start to pay (compiled)
        gate.record(1, drafts, seconds=round_seconds if drafts else 0.005, tokens=2 if drafts else 1)
    assert runs[20:100].count(True) <= 2 * gate.SAMPLES and runs[200:].count(False) <= 2 * gate.SAMPLES


@pytest.fixture
def one_thread():
    """The gate times steps: one torch thread, which a busy 2-core machine stalls far less than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def auto_decoding(model, steps: int, **settings) -> tuple[list[int], dict]:
    """Greedy batch-1 decoding with speculative="auto" → (its tokens, its DraftGate); they must be plain
    decoding's tokens."""
    p = prompt(6, seed=3)
    engine = Engine(model, max_batch_size=1, page_size=4, **settings)
    out = engine.generate([p], SamplingParams(max_tokens=steps, **GREEDY))[0].outputs[0].token_ids
    plain = Engine(model, max_batch_size=1, page_size=4, speculative="off")
    assert out == plain.generate([p], SamplingParams(max_tokens=steps, **GREEDY))[0].outputs[0].token_ids
    return out, engine.drafter.gate


def test_auto_stops_drafting_with_an_untrained_mtp_module(one_thread):
    """A random MTP module's drafts are rejected: a round costs more than a plain step and emits about as
    many tokens, so "auto" measures that and decodes plainly, retrying a round only now and then."""
    model = tiny_model("deepseek_v3", seed=2, num_hidden_layers=4)
    _, gate = auto_decoding(model, 100)
    assert gate.speed(1, False) > gate.speed(1, True)
    assert gate.buckets[1]["seen"][False] > 2 * gate.buckets[1]["seen"][True]


def test_auto_keeps_drafting_with_an_exact_mtp_module(one_thread):
    """An MTP module that predicts exactly what the model will (mostly_bigram at scale 0): every draft of a
    3-token chain is accepted, a round emits 4 tokens for far less than 4 steps' work, and "auto" keeps
    drafting, measuring a plain step only now and then."""
    model = mostly_bigram(tiny_model("deepseek_v3", seed=1, num_hidden_layers=6), scale=0.0)
    _, gate = auto_decoding(model, 100, num_speculative_tokens=3)
    assert gate.speed(1, True) > gate.speed(1, False)
    assert gate.buckets[1]["seen"][True] > 2 * gate.buckets[1]["seen"][False]


class EveryNthStep(DraftGate):
    """A gate that drafts one step in `n` (no timing): long plain stretches between rounds."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.step = n, 0

    def drafts(self, rows: int) -> bool:
        self.step += 1
        return self.step % self.n == 0


def test_drafts_after_plain_steps_are_what_the_mtp_module_predicts(monkeypatch):
    """Plain steps keep the main hidden states; the next round (or a catch-up pass, past CATCH_UP_ROWS) fills
    the MTP caches over them: the drafts are then the MTP module's over the full sequence."""
    monkeypatch.setattr(speculative, "CATCH_UP_ROWS", 5)
    model = tiny_model("deepseek_v3", num_nextn_predict_layers=2)
    engine = Engine(model, page_size=4, num_speculative_tokens=2)
    engine.drafter.gate = EveryNthStep(9)  # stretches of 8 plain steps: caught up at 6 rows, and before a round
    rounds, draft_chain = [], engine.drafter.draft_chain

    def recording_draft_chain(inputs, *args):
        drafts = draft_chain(inputs, *args)
        ms = inputs[:, 1].tolist()
        rounds.extend((s, m, d1, d2) for s, m, d1, d2 in zip(engine.running, ms, *(d.tolist() for d in drafts)))
        return drafts

    engine.drafter.draft_chain = recording_draft_chain
    prompts = [prompt(7, seed=1), prompt(12, seed=2)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=40, **GREEDY))
    assert len(rounds) >= 6
    for seq, m, first, second in rounds:
        with torch.no_grad():  # the sequence up to token m, then the first draft (which depth 2 reads)
            _, mtp = model(torch.tensor([(seq.prompt + seq.output)[: m + 1] + [first]]), return_mtp=True)
        assert first == int(mtp[0][0, m - 1].argmax())  # depth 1 at position m - 1 predicts token m + 1
        assert second == int(mtp[1][0, m - 1].argmax())  # depth 2 there, token m + 2
    assert [o.outputs[0].token_ids for o in outs] == [naive_greedy(model, p, 40) for p in prompts]


@pytest.mark.parametrize("right, most_often", [(3, 3), (2, 2), (1, 1), (0, 1)])
def test_auto_chain_length_follows_the_sequences_acceptance(right, most_often):
    """A sequence whose first `right` drafts are always accepted settles on that many drafts (at least
    one), retrying a longer chain only now and then."""
    chain = ChainLength(3)
    assert chain.next() == 3  # nothing measured yet: the longest chain
    lengths = []
    for _ in range(400):
        n = chain.next()
        chain.record(accepted=min(right, n), drafted=n)
        lengths.append(n)
    settled = lengths[100:]
    assert settled.count(most_often) > 0.85 * len(settled)
    assert all(n >= most_often for n in settled)


@pytest.mark.parametrize("draft_tokens", [1, 2])
def test_speculative_sampling_keeps_the_output_distribution(draft_tokens):
    """Draft k tokens from the MTP distributions q (chained for k > 1), verify by rejection sampling: the
    first k + 1 tokens (the prefill's, then one round's) must follow the model's own joint distribution
    p(t1) p(t2 | t1) ..., whatever q is."""
    vocab, length = 6, draft_tokens + 1
    model = tiny_model("deepseek_v3", seed=3, vocab_size=vocab, initializer_range=0.5)
    context = [1, 2, 3, 4, 5]
    joint = torch.ones(1)
    with torch.no_grad():
        for step in range(length):  # joint over every prefix of `step` tokens, in lexicographic order
            prefixes = list(itertools.product(range(vocab), repeat=step))
            prefixes = torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), step)
            nxt = model(torch.cat((torch.tensor(context).expand(len(prefixes), -1), prefixes), 1))[:, -1].softmax(-1)
            joint = (joint[:, None] * nxt).flatten()
    engine = Engine(model, max_batch_size=200, page_size=4, cache_tokens=2000, speculative="mtp",
                    num_speculative_tokens=draft_tokens)
    n = 3000
    outs = engine.generate([context] * n, [SamplingParams(temperature=1.0, seed=i, max_tokens=length, ignore_eos=True)
                                           for i in range(n)])
    counts = torch.zeros(vocab**length)
    for out in outs:
        counts[sum(t * vocab ** (length - 1 - i) for i, t in enumerate(out.outputs[0].token_ids))] += 1
    expected = joint * n
    big = expected >= 5  # lump rare cells so that the chi-square approximation holds
    observed = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    expect = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    chi2 = float(((observed - expect) ** 2 / expect).sum())
    df = len(observed) - 1
    assert chi2 < df + 3.3 * math.sqrt(2 * df) + 10, (chi2, df)  # far beyond p = 0.001 only if biased
    stats = engine.stats()
    assert 0.05 < stats["spec_acceptance_rate"] < 0.95  # both accepting and rejecting paths were taken
    assert stats["spec_drafted"] == draft_tokens * stats["spec_rounds"]


# ---- continuous batching, sampling, seeds -------------------------------------------------------------
MIXED = [
    SamplingParams(max_tokens=9, **GREEDY),
    SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=14, ignore_eos=True),
    SamplingParams(temperature=1.2, top_k=20, min_p=0.02, seed=5, max_tokens=4, ignore_eos=True),
    SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4, seed=2,
                   max_tokens=11, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=9, n=2, max_tokens=6, ignore_eos=True),
]


@pytest.mark.parametrize("speculative, draft_tokens", [("off", None), ("auto", None), ("mtp", None), ("mtp", "auto")])
def test_requests_give_the_same_output_alone_and_in_a_busy_batch(speculative, draft_tokens):
    model = tiny_model("deepseek_v3")
    prompts = [prompt(n, seed=n) for n in (5, 12, 7, 20, 9)]
    settings = dict(page_size=4, speculative=speculative, num_speculative_tokens=draft_tokens)
    alone = [Engine(model, **settings).generate([p], [sp])[0] for p, sp in zip(prompts, MIXED)]
    busy = Engine(model, max_batch_size=3, **settings)
    together = busy.generate(prompts * 2, MIXED * 2)  # more requests than batch slots: they join as others leave
    for a, b, c in zip(alone, together[:5], together[5:]):
        assert tokens(a) == tokens(b) == tokens(c)
    assert len(set(map(tuple, tokens(alone[4])))) == 2  # n=2 samples differ (seeds seed + i)


def test_a_short_request_does_not_wait_for_a_long_one():
    engine = Engine(tiny_model("llama"), page_size=4)
    long = engine.submit(prompt_ids=prompt(10, 1), params=SamplingParams(max_tokens=40, **GREEDY))
    short = engine.submit(prompt_ids=prompt(6, 2), params=SamplingParams(max_tokens=3, **GREEDY))
    steps = 0
    while not short.done:
        engine.step()
        steps += 1
    assert steps <= 3 and not long.done
    late = engine.submit(prompt_ids=prompt(4, 3), params=SamplingParams(max_tokens=2, **GREEDY))
    engine.step()
    engine.step()
    assert late.done and not long.done  # joined the running batch and left it
    assert len(long.result().outputs[0].token_ids) == 40


@pytest.mark.parametrize("speculative", ["off", "auto"])
def test_long_prompts_prefill_in_chunks_while_others_keep_decoding(speculative):
    model = tiny_model("deepseek_v3")
    engine = Engine(model, page_size=4, max_prefill_tokens=8, speculative=speculative)
    running = engine.submit(prompt_ids=prompt(5, 1), params=SamplingParams(max_tokens=30, **GREEDY))
    engine.step()
    long = engine.submit(prompt_ids=prompt(50, 2), params=SamplingParams(max_tokens=6, n=2, **GREEDY))
    for _ in range(3):  # 50 prompt tokens at 8 per step: still prefilling, the other request still decodes
        before = len(running.sequences[0].output)
        engine.step()
        assert len(running.sequences[0].output) > before and not long.sequences[0].output
    assert tokens(long.result()) == [naive_greedy(model, prompt(50, 2), 6)] * 2
    assert tokens(running.result())[0] == naive_greedy(model, prompt(5, 1), 30)


def test_seeds_reproduce_and_differ():
    model = tiny_model("qwen2").train()  # a trainer's model (GRPO rollouts): the engine keeps its mode
    engine = Engine(model, page_size=4)
    p = prompt(8, 4)

    def run(seed):
        return engine.generate([p], SamplingParams(temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True))[0]

    assert tokens(run(1)) == tokens(run(1))
    assert tokens(run(1)) != tokens(run(2))
    assert model.training


def test_logprobs_are_the_models_log_softmax_with_sorted_alternatives():
    model = tiny_model("deepseek_v3")
    p = prompt(7, 5)
    out = Engine(model, page_size=4).generate([p], SamplingParams(max_tokens=6, logprobs=True, top_logprobs=3,
                                                                  **GREEDY))[0].outputs[0]
    with torch.no_grad():
        reference = model(torch.tensor([p + out.token_ids]))[0].log_softmax(-1)
    assert len(out.logprobs) == 6
    for i, entry in enumerate(out.logprobs):
        row = reference[len(p) - 1 + i]
        assert entry.token_id == out.token_ids[i]
        assert abs(entry.logprob - row[entry.token_id].item()) < 1e-4
        assert [t for t, _, _ in entry.top] == row.topk(3).indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy picks the most likely token


# ---- the cache pool: prefix reuse, forks, a full pool ----------------------------------------------------
def test_prompts_sharing_a_prefix_reuse_its_pages():
    model = tiny_model("deepseek_v3")
    engine = Engine(model, page_size=4)
    base = prompt(21, 6)
    first = engine.generate([base], SamplingParams(max_tokens=5, **GREEDY))[0]
    second = engine.generate([base + [7, 8, 9]], SamplingParams(max_tokens=5, **GREEDY))[0]
    assert first.cached_tokens == 0 and second.cached_tokens == 20  # 5 full pages of the shared prefix
    assert second.metrics["cached_tokens"] == 20 and engine.stats()["cached_prefix_tokens"] == 20
    assert tokens(second)[0] == naive_greedy(model, base + [7, 8, 9], 5)


def test_n_samples_share_the_prompt_pages():
    engine = Engine(tiny_model("llama"), page_size=4)
    p = prompt(18, 7)
    request = engine.submit(prompt_ids=p, params=SamplingParams(temperature=1.0, seed=0, n=3, max_tokens=8,
                                                                ignore_eos=True))
    engine.step()
    parent, *children = request.sequences
    for child in children:  # 4 full pages shared, the page holding the last prompt token copied
        assert child.pages[:4] == parent.pages[:4] and child.pages[4] != parent.pages[4]
    out = request.result()
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 8 for c in out.outputs)
    assert engine.stats()["pages_free"] == engine.stats()["pages_total"]


def test_a_full_pool_makes_requests_wait_and_all_complete():
    model = tiny_model("deepseek_v3")
    params = SamplingParams(max_tokens=20, **GREEDY)
    prompts = [prompt(n, seed=n) for n in (10, 14, 8, 12)]
    engine = Engine(model, page_size=4, cache_tokens=36)  # one request (≤ 14 + 20 + 1 tokens) at a time
    most_running = []
    outs = []
    for p in prompts:
        outs.append(engine.submit(prompt_ids=p, params=params,
                                  on_event=lambda e: most_running.append(engine.stats()["running"])))
    results = [r.result() for r in outs]
    assert max(most_running) == 1
    assert [tokens(r)[0] for r in results] == [naive_greedy(model, p, 20) for p in prompts]
    assert engine.stats()["pages_free"] == engine.stats()["pages_total"]


# ---- streaming, cancellation, background thread ----------------------------------------------------------
def test_background_engine_streams_and_cancels():
    engine = Engine(tiny_model("llama"), page_size=4)
    engine.start()
    try:
        seen = []
        request = engine.submit(prompt_ids=prompt(6, 8), params=SamplingParams(max_tokens=100, **GREEDY),
                                on_event=seen.append)
        events = []
        for event in request:
            events.append(event)
            if len(events) == 2:
                request.cancel()
        out = request.result(timeout=30)
        assert events[-1].finish_reason == "cancelled" and out.outputs[0].finish_reason == "cancelled"
        assert len(out.outputs[0].token_ids) < 100
        assert sum((e.token_ids for e in events), []) == out.outputs[0].token_ids
        assert seen == events
        ok = engine.submit(prompt_ids=prompt(5, 9), params=SamplingParams(max_tokens=4, **GREEDY)).result(timeout=30)
        assert ok.outputs[0].finish_reason == "length"
    finally:
        engine.stop()
    stats = engine.stats()
    assert stats["pages_free"] == stats["pages_total"] and stats["requests_cancelled"] == 1


def test_a_waiting_request_can_be_cancelled():
    engine = Engine(tiny_model("llama"), page_size=4)
    request = engine.submit(prompt_ids=prompt(5, 1), params=SamplingParams(max_tokens=4, **GREEDY))
    request.cancel()
    assert request.result().outputs[0].finish_reason == "cancelled"


# ---- bad input -------------------------------------------------------------------------------------------
def test_bad_requests_raise_clear_errors():
    engine = Engine(tiny_model("llama"), page_size=4)
    with pytest.raises(EngineRequestError, match="prompt has 128 tokens; the model's context is 128"):
        engine.submit(prompt_ids=[3] * 128)
    with pytest.raises(EngineRequestError, match=r"max_tokens=100 plus the prompt's 30 tokens"):
        engine.submit(prompt_ids=[3] * 30, params=SamplingParams(max_tokens=100))
    with pytest.raises(EngineRequestError, match=r"prompt_ids\[1\] = 96"):
        engine.submit(prompt_ids=[3, 96])
    with pytest.raises(EngineRequestError, match="empty"):
        engine.submit(prompt_ids=[])
    with pytest.raises(EngineRequestError, match="no tokenizer"):
        engine.submit("hello")
    with pytest.raises(SamplingError, match="temperature must be >= 0, got -0.5"):
        engine.submit(prompt_ids=[3], params=SamplingParams(temperature=-0.5))
    with pytest.raises(SamplingError, match="top_p must be <= 1, got 1.5"):
        SamplingParams(top_p=1.5)
    params = SamplingParams()
    params.top_p = 0.0  # mutated after construction: the engine validates again
    with pytest.raises(SamplingError, match="top_p must be > 0"):
        engine.submit(prompt_ids=[3], params=params)
    small = Engine(tiny_model("llama"), page_size=4, cache_tokens=16)
    with pytest.raises(EngineRequestError, match="KV cache"):
        small.submit(prompt_ids=[3] * 10, params=SamplingParams(max_tokens=20))
    assert issubclass(EngineRequestError, HematError) and issubclass(SamplingError, HematError)


# ---- text: a scripted model that spells out a known reply -------------------------------------------------
REPLY = "<think>\nplan</think>Yes, 42."


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A llama whose next token depends only on the current one (attention and MLP outputs zeroed,
    lm_head rows = embeddings of the predecessor), scripted to answer `<|assistant|>` with REPLY, EOS."""
    root = tmp_path_factory.mktemp("scripted")
    (root / "corpus.txt").write_text("Yes, the plan is 42. Let us think it through and answer.\n" * 40)
    tokenizer = train_tokenizer([root / "corpus.txt"], 300, root / "model", show_progress=False)
    script = [tokenizer.token_to_id("<|assistant|>")] + tokenizer.encode(REPLY) + [tokenizer.eos_token_id]
    assert len(set(script)) == len(script)
    config = ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=0, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_()
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for a, b in zip(script, script[1:]):
            model.lm_head.weight[b] = 20 * emb[a] / emb[a].norm()
    model.save_pretrained(root / "model")
    return model, tokenizer, script, root / "model"


def test_chat_reasoning_is_split_from_the_answer_also_while_streaming(scripted):
    model, tokenizer, script, _ = scripted
    engine = Engine(model, tokenizer, page_size=4)
    request = engine.submit(messages=[{"role": "user", "content": "hi"}], params=SamplingParams(temperature=0))
    events = list(request)
    out = request.result().outputs[0]
    assert out.reasoning_text == "\nplan" and out.text == "Yes, 42."
    assert out.finish_reason == "stop" and out.token_ids == script[1:]  # EOS ends it; its id is kept, not its text
    assert "".join(e.text for e in events) == out.text
    assert "".join(e.reasoning_text for e in events) == out.reasoning_text
    first_answer = next(i for i, e in enumerate(events) if e.text)
    assert any(e.reasoning_text for e in events[:first_answer]) and len(events) > 5
    # a template whose generation prompt opens the reasoning: the reply starts inside it
    opened = copy.copy(tokenizer)
    opened.chat_template = tokenizer.chat_template.replace("'<|assistant|>' }}{% endif %}",
                                                           "'<|assistant|><think>' }}{% endif %}")
    assert opened.chat_template != tokenizer.chat_template
    out = Engine(model, opened, page_size=4).generate([[{"role": "user", "content": "hi"}]],
                                                      SamplingParams(temperature=0))[0].outputs[0]
    assert out.reasoning_text == "\nplan" and out.text == "Yes, 42." and out.token_ids == script[2:]


@pytest.mark.parametrize("stop, text", [(["s, 4"], "<think>\nplan</think>Ye"), (["42!"], REPLY),
                                        (["an</th", "Yes"], "<think>\npl")])
def test_stop_strings_match_across_tokens_and_are_not_returned(scripted, stop, text):
    model, tokenizer, _, _ = scripted
    engine = Engine(model, tokenizer, page_size=4)
    out = engine.generate(["<|assistant|>"], SamplingParams(temperature=0, stop=stop))[0].outputs[0]
    assert out.text == text and out.finish_reason == "stop"  # REPLY: no match, the EOS stopped it


def test_stop_token_ids_and_max_tokens(scripted):
    model, tokenizer, script, _ = scripted
    engine = Engine(model, tokenizer, page_size=4)
    yes = next(t for t in script if tokenizer.decode([t]).startswith("Y"))
    out = engine.generate(["<|assistant|>"], SamplingParams(temperature=0, stop_token_ids=[yes]))[0].outputs[0]
    assert out.token_ids[-1] == yes and out.text == "<think>\nplan</think>" and out.finish_reason == "stop"
    out = engine.generate(["<|assistant|>"], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_cli_generate_and_chat(scripted, capsys, monkeypatch):
    _, _, _, model_dir = scripted
    main(["generate", "--model", str(model_dir), "--prompt", "<|assistant|>", "--temperature", "0"])
    captured = capsys.readouterr()
    assert REPLY in captured.out and "tokens/s" in captured.err
    main(["generate", "--model", str(model_dir), "--prompt", "hi", "--chat", "--temperature", "0"])
    captured = capsys.readouterr()
    assert "plan\n\nYes, 42." in captured.out and "<think>" not in captured.out
    lines = iter(["hello", "/reset", "again"])

    def fake_input(prompt_text=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    main(["chat", "--model", str(model_dir), "--temperature", "0", "--system", "be brief"])
    captured = capsys.readouterr()
    assert captured.out.count("Yes, 42.") == 2 and captured.err.count("tokens/s") == 2
