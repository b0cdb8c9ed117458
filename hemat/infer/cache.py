"""The paged KV cache: one preallocated pool of fixed-size pages shared by all running sequences.

A sequence owns a list of pages (its block table); token position p lives in slot
`pages[p // page_size] * page_size + p % page_size` of every layer's storage. MLA layers store only the
normalised latent (kv_lora_rank) and the RoPE key (qk_rope_head_dim) per token, side by side in one
store so that one gather reads both; GQA layers per-head K and V. MTP layers (indices
num_hidden_layers + d) get storage too, so drafts have context.

Pages are reference-counted. Full pages of a prompt are registered under a hash of every token up to
their end, so a later prompt with the same prefix reuses them instead of recomputing; a registered page
whose last user ended stays cached (evictable, least recently used first) until the pool needs it.
Page 0 is never handed out: padded rows of a batch write there and read from there, masked out.

Per forward, `begin_step` turns the batch's block tables, start positions and new-token counts into
write slots, read slots and the attention mask once; every layer's `attend` then writes its new entries and
attends to the cached ones: on a CPU where hemat's kernels run, a few new tokens per row read the pages in
place (hemat::paged_attention, paged_attention.cpp); otherwise the entries are gathered to [B, S, ...] for
the model's own attention function."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from hemat.errors import HematError
from hemat.infer import native
from hemat.model.config import ModelConfig

PAGED_KERNEL_TOKENS = 16  # new tokens per row up to which the paged kernel attends (decode, drafts' verify);
# longer steps (prefill) gather the pages for SDPA's blocked kernels


class PageAllocator:
    """Page bookkeeping: free list, reference counts, the prefix table and reservations.

    `reserved` counts pages promised to admitted sequences but not yet taken, so that a sequence,
    once admitted, can always grow to its limit: nothing is ever preempted."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self.free = list(range(num_pages, 0, -1))  # page 0 is the scratch page
        self.refcount = [0] * (num_pages + 1)
        self.evictable: OrderedDict[int, bytes] = OrderedDict()  # refcount-0 pages still in the prefix table
        self.prefix: dict[bytes, int] = {}  # hash of tokens[: end of page] -> page
        self.key_of: dict[int, bytes] = {}
        self.reserved = 0

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable) - self.reserved

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def page_keys(self, token_ids: Sequence[int], num_pages: int, salt: str = "") -> list[bytes]:
        """Chained hashes of the first num_pages full pages: key i covers tokens[: (i + 1) * page_size].
        A salt keeps apart caches the same tokens have under different weights (a LoRA adapter's index)."""
        keys, key, ps = [], salt.encode(), self.page_size
        for i in range(num_pages):
            chunk = ",".join(map(str, token_ids[i * ps : (i + 1) * ps])).encode()
            key = hashlib.blake2b(key + chunk, digest_size=16).digest()
            keys.append(key)
        return keys

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """Pages of the longest cached prefix of these keys."""
        pages = []
        for key in keys:
            page = self.prefix.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def acquire(self, pages: Sequence[int]) -> None:
        for page in pages:
            self.evictable.pop(page, None)
            self.refcount[page] += 1

    def allocate(self) -> int:
        """A fresh page with refcount 1, taken from the caller's reservation."""
        if self.free:
            page = self.free.pop()
        elif self.evictable:
            page, key = self.evictable.popitem(last=False)
            del self.prefix[key], self.key_of[page]
        else:
            raise HematError("KV cache pool exhausted: a sequence grew past its reservation (engine bug)")
        self.reserved -= 1
        self.refcount[page] = 1
        return page

    def release(self, pages: Sequence[int]) -> None:
        for page in pages:
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                if page in self.key_of:
                    self.evictable[page] = self.key_of[page]
                else:
                    self.free.append(page)

    def register(self, pages: Sequence[int], keys: Sequence[bytes]) -> None:
        """Make full pages findable by later prompts (first writer of a prefix wins)."""
        for page, key in zip(pages, keys):
            if key not in self.prefix and page not in self.key_of:
                self.prefix[key] = page
                self.key_of[page] = key


class PagedCache:
    """Storage for every attention layer plus the per-step index tensors (see the module docstring)."""

    def __init__(self, config: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device, num_layers: int | None = None):
        if page_size < 1 or num_pages < 1:
            raise HematError(f"the KV cache needs page_size >= 1 and at least one page, got {page_size}, {num_pages}")
        self.config, self.page_size, self.num_pages = config, page_size, num_pages
        self.allocator = PageAllocator(num_pages, page_size)
        num_layers = config.num_hidden_layers if num_layers is None else num_layers
        slots = (num_pages + 1) * page_size
        if config.is_mla:  # the latent and the RoPE key side by side in one store, written and gathered in one go
            width = config.kv_lora_rank + config.qk_rope_head_dim
            self.stores = [(torch.zeros(slots, width, dtype=dtype, device=device),) for _ in range(num_layers)]
        else:
            shape = (config.num_key_value_heads, config.dense_head_dim)
            self.stores = [tuple(torch.zeros(slots, *shape, dtype=dtype, device=device) for _ in "kv")
                           for _ in range(num_layers)]
        elements = sum(t[0].numel() for t in self.stores[0]) if num_layers else 0
        element_size = torch.empty(0, dtype=dtype).element_size()
        # bytes one token costs in the main layers (MTP layers' share is reported apart)
        self.bytes_per_token = elements * element_size * config.num_hidden_layers
        self.mtp_bytes_per_token = elements * element_size * (num_layers - config.num_hidden_layers)
        self.device = device
        head_sizes = (width,) if config.is_mla else shape[1:]
        self.paged_kernel = (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                             and all(size % 16 == 0 for size in head_sizes) and native.kernels())
        self._write = self._read = self._mask = self._pages = None
        self._positions = torch.arange(page_size, device=device)
        self._shape = (0, 0, 0)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def begin_step(self, block_tables: Sequence[Sequence[int]], starts: Sequence[int],
                   lengths: Sequence[int]) -> torch.Tensor:
        """Prepare a forward over len(block_tables) rows where row i writes lengths[i] new tokens at
        positions starts[i]... and attends to every cached token before them. Returns the positions
        [B, T] of the new tokens (padding positions repeat past the row's end and are masked)."""
        ps = self.page_size
        t = max(lengths)
        totals = [first + n for first, n in zip(starts, lengths)]
        width = -(-max(totals) // ps)  # pages that hold positions < s
        # one host-to-device copy for the step: [block table | start | total] per row
        rows = [list(p[:width]) + [0] * (width - len(p[:width])) + [first, total]
                for p, first, total in zip(block_tables, starts, totals)]
        step = torch.tensor(rows, dtype=torch.long).to(self.device)
        return self.set_step(step[:, :width], step[:, width : width + 1], step[:, width + 1 :], t, max(totals))

    def set_step(self, table: torch.Tensor, start: torch.Tensor, total: torch.Tensor, t: int, s: int,
                 own_aranges: bool = False) -> torch.Tensor:
        """begin_step's device half, from tensors: block tables [B, W] (W · page_size >= s), first new
        position [B, 1] and positions written after the step [B, 1]; T new tokens per row over a span of S.
        Only tensor ops on fixed shapes, so a CUDA graph can record it (see cuda_graphs.py); a graph
        passes own_aranges=True so that it reads no kept tensor that a later, longer step replaces."""
        ps = self.page_size
        arange = (lambda n: torch.arange(n, device=self.device)) if own_aranges else self._arange
        q_pos = start + arange(t)  # [B, T]
        k_pos = arange(s)  # [S]
        slot_of = (table[:, :, None] * ps + arange(ps)).flatten(1)  # [B, W * ps]: slot of each position
        self._write = torch.where(q_pos < total, slot_of.gather(1, q_pos.clamp(max=slot_of.shape[1] - 1)), 0).flatten()
        self._read = torch.where(k_pos < total, slot_of[:, :s], 0).flatten()
        # a padded query attends like the row's last token, so no softmax row is empty
        self._mask = k_pos <= torch.minimum(q_pos, total - 1)[:, :, None]  # [B, T, S]
        self._pages = (table, q_pos, total)
        self._shape = (table.shape[0], t, s)
        return q_pos

    def _arange(self, n: int) -> torch.Tensor:
        """0..n-1 (a view of one kept arange, grown as needed)."""
        if self._positions.shape[0] < n:
            self._positions = torch.arange(max(n, 2 * self._positions.shape[0]), device=self.device)
        return self._positions[:n]

    def attend(self, layer_idx: int, attention, q: torch.Tensor, new: tuple[torch.Tensor, ...],
               scale: float) -> torch.Tensor:
        """Write the new tokens' entries of one layer (GQA's k and v, MLA's latent and k_pe), then attend q
        [B, T, H, d] to every entry of its sequence → [B, T, H, dv]: `attention(q, *entries, mask, scale)`
        over the entries gathered to [B, S, ...] (MLA's latent and k_pe as the two halves of one gathered
        buffer), or the same computed by hemat's paged kernel (MLA: one key/value head, the latent the
        value)."""
        b, t, s = self._shape
        stores, widths = self.stores[layer_idx], [x.shape[-1] for x in new]
        if len(stores) < len(new):  # MLA: whole rows in one write (torch.compile copies a whole store
            new = (torch.cat([x.reshape(b * t, -1) for x in new], dim=-1),)  # to write into column views of it)
        for store, x in zip(stores, new):
            x = x.reshape(b * t, *store.shape[1:])
            store.index_copy_(0, self._write, x if x.dtype == store.dtype else x.to(store.dtype))
        if self.paged_kernel and t <= PAGED_KERNEL_TOKENS and q.dtype == stores[0].dtype:
            k, v = stores if len(stores) == 2 else (stores[0][:, None], stores[0][:, None, : widths[0]])
            return torch.ops.hemat.paged_attention(q, k, v, *self._pages, self.page_size, scale)
        entries = [store.index_select(0, self._read).view(b, s, *store.shape[1:]) for store in stores]
        if len(entries) < len(widths):
            entries = entries[0].split(widths, dim=-1)
        return attention(q, *entries, self._mask, scale)

    def copy_page(self, src: int, dst: int) -> None:
        """Copy one page's entries in every layer (a forked sequence's own copy of a shared page)."""
        ps = self.page_size
        for stores in self.stores:
            for store in stores:
                store[dst * ps : (dst + 1) * ps] = store[src * ps : (src + 1) * ps]
