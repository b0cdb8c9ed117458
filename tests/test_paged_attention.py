"""hemat::paged_attention (paged_attention.cpp): attention read in place from the paged KV cache, against
the cache's gathered entries through the models' own attention functions, and whole cached forwards
through it against the uncached model."""

import pytest
import torch

from hemat.infer import native
from hemat.infer.cache import PAGED_KERNEL_TOKENS, PagedCache
from hemat.model.dense import attend
from hemat.model.mla import attend_latent
from tests.test_engine import prompt, tiny_model
from tests.test_native_kernels import needs_native_kernels, pytorch_kernels

PAGE = 4


def paged_case(b: int, t: int, heads: int, kv_heads: int, width: int, dtype, seed: int):
    """Stores over 12 pages of 4 slots, rows with non-contiguous pages and different lengths, and a last
    row that is batch padding (total 0, every slot the scratch page 0)."""
    gen = torch.Generator().manual_seed(seed)
    slots = 13 * PAGE
    k = torch.randn(slots, kv_heads, width, generator=gen).to(dtype)
    v = torch.randn(slots, kv_heads, width, generator=gen).to(dtype)
    q = torch.randn(b, t, heads, width, generator=gen).to(dtype)
    table = torch.stack([torch.randperm(12, generator=gen)[:4] + 1 for _ in range(b)])
    total = torch.randint(t, 4 * PAGE + 1, (b, 1), generator=gen)
    table[-1], total[-1] = 0, 0
    q_pos = total - t + torch.arange(t)
    q_pos[-1] = torch.arange(t)
    return q, k, v, table, q_pos, total


def gathered(store: torch.Tensor, table: torch.Tensor, span: int) -> torch.Tensor:
    """The cache's own read: every row's positions 0..span-1 as [B, S, ...]."""
    slot_of = (table[:, :, None] * PAGE + torch.arange(PAGE)).flatten(1)[:, :span]
    return store[slot_of.flatten()].view(len(table), span, *store.shape[1:])


def cache_mask(q_pos, total, span):
    return torch.arange(span) <= torch.minimum(q_pos, total - 1)[:, :, None]


@needs_native_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("heads,kv_heads,width", [(4, 4, 16), (6, 2, 64), (3, 1, 128)])
def test_paged_attention_equals_sdpa_over_the_gathered_cache(dtype, t, heads, kv_heads, width):
    assert native.kernels()
    q, k, v, table, q_pos, total = paged_case(5, t, heads, kv_heads, width, dtype, seed=width + t)
    span = int(total.max())
    got = torch.ops.hemat.paged_attention(q, k, v, table, q_pos, total, PAGE, 0.3)
    mask = cache_mask(q_pos, total, span)
    want = attend(q.float(), gathered(k, table, span).float(), gathered(v, table, span).float(), mask, 0.3)
    assert got.shape == want.shape and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[:-1].float(), want[:-1], atol=tolerance, rtol=tolerance)
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))  # a padding row attends to nothing: zeros, not NaN


@needs_native_kernels
def test_paged_attention_reads_mla_latents_as_one_shared_head():
    """MLA: keys are [latent ; k_pe] rows of one store, values their first r columns (a strided view)."""
    r, rope = 32, 16
    q, store, _, table, q_pos, total = paged_case(3, 2, 4, 1, r + rope, torch.float32, seed=1)
    store = store[:, 0]
    span = int(total.max())
    got = torch.ops.hemat.paged_attention(q, store[:, None], store[:, None, :r], table, q_pos, total, PAGE, 0.2)
    entries = gathered(store, table, span)
    want = attend_latent(q, entries[..., :r], entries[..., r:], cache_mask(q_pos, total, span), 0.2)
    torch.testing.assert_close(got[:-1], want[:-1], atol=1e-5, rtol=1e-5)


@needs_native_kernels
@pytest.mark.parametrize("kind,sizes", [("llama", dict(hidden_size=64)),  # heads of 16
                                        ("deepseek_v3", dict(kv_lora_rank=32, qk_rope_head_dim=16))])
def test_cached_forwards_through_the_paged_kernel_equal_the_full_forward(kind, sizes):
    """A prefill longer than PAGED_KERNEL_TOKENS (gathered, SDPA), then steps of 1 to 9 tokens through the
    kernel, row by row equal to the uncached model."""
    model = tiny_model(kind, **sizes)
    cache = PagedCache(model.config, num_pages=20, page_size=PAGE, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.paged_kernel
    seqs = [prompt(30, seed=n) for n in (1, 2)]
    tables = [[2 * j + 1 + i for j in range(8)] for i in range(2)]
    done, got = [0, 0], [[], []]
    with torch.no_grad():
        for chunk in ([PAGED_KERNEL_TOKENS + 2, 9], [1, 9], [3, 1], [1, 3]):
            width = max(chunk)
            ids = torch.tensor([seq[d : d + n] + [0] * (width - n) for seq, d, n in zip(seqs, done, chunk)])
            positions = cache.begin_step(tables, done, chunk)
            logits = model(ids, positions=positions, cache=cache)
            for i in range(2):
                got[i].append(logits[i, : chunk[i]])
                done[i] += chunk[i]
        for i, seq in enumerate(seqs):
            full = model(torch.tensor([seq[: done[i]]]))[0]
            torch.testing.assert_close(torch.cat(got[i]), full, atol=1e-4, rtol=1e-4)


def test_the_cache_gathers_where_hemat_kernels_are_off(monkeypatch):
    with pytorch_kernels(monkeypatch):
        cache = PagedCache(tiny_model("llama", hidden_size=64).config, num_pages=4, page_size=PAGE,
                           dtype=torch.float32, device=torch.device("cpu"))
    assert not cache.paged_kernel
