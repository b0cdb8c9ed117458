"""A rank-aware, resumable loader over the token shards written by `hemat data prepare`.

A split is one token stream (its shards concatenated), cut into non-overlapping windows of
seq_len + 1 tokens. Each epoch visits the windows in a permutation seeded by (seed, epoch). The
global batch order is defined first: global batch k is samples [k*G, (k+1)*G) of that endless
stream, G = batch_size * world_size, and rank r takes rows [r*B, (r+1)*B). So ranks together see
exactly what one process with the global batch size sees, and the state (epoch, position in samples)
is the same on every rank: a checkpoint saved by 2 ranks resumes on 1. Shards are memory-mapped and
only the rows a rank needs are read."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from hemat.data.shards import DataError, read_manifest


class TokenSplit:
    """The concatenated token stream of one split, read through np.memmap."""

    def __init__(self, data_dir: str | Path, split: str, manifest: dict | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = manifest or read_manifest(data_dir)
        self.split = split
        shards = [s for s in self.manifest["shards"] if s["split"] == split]
        if not shards or sum(s["tokens"] for s in shards) == 0:
            raise DataError(f"{data_dir}: split {split!r} is empty (splits: {', '.join(self.manifest['splits'])})")
        dtype = np.dtype(self.manifest["dtype"])
        self.maps = []
        for shard in shards:
            path = self.data_dir / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"{path}: missing or not {shard['tokens']} {dtype} tokens as the manifest says")
            self.maps.append(np.memmap(path, dtype=dtype, mode="r"))
        self.offsets = np.cumsum([0] + [len(m) for m in self.maps])  # start of each shard in the stream
        self.tokens = int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64, across shard boundaries if need be."""
        parts = []
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while length > 0:
            local = start - int(self.offsets[shard])
            part = self.maps[shard][local: local + length]
            parts.append(part)
            start, length, shard = start + len(part), length - len(part), shard + 1
        return np.concatenate(parts).astype(np.int64)

    def windows(self, seq_len: int) -> int:
        """How many non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets) fit."""
        count = (self.tokens - 1) // seq_len
        if count == 0:
            raise DataError(f"{self.data_dir}: split {self.split!r} has {self.tokens} tokens, too few for one "
                            f"sequence of {seq_len} + 1")
        return count


class TokenLoader:
    """(inputs, targets) int64 tensors [batch_size, seq_len] for one rank, in a deterministic order."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(data_dir)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.data = TokenSplit(data_dir, split, self.manifest)
        self.num_windows = self.data.windows(seq_len)
        self.epoch = 0
        self.position = 0  # samples of the current epoch already consumed by all ranks together
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.num_windows))
        return self._order[1]

    def _rows(self, data: TokenSplit, windows: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.seq_len
        batch = torch.from_numpy(np.stack([data.read(w * t, t + 1) for w in windows]))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # the global sample index of this rank's first row; samples past the epoch's end roll into the next
        first = self.epoch * self.num_windows + self.position + self.rank * self.batch_size
        windows = []
        for sample in range(first, first + self.batch_size):
            epoch, index = divmod(sample, self.num_windows)
            windows.append(int(self._permutation(epoch)[index]))
        self.epoch, self.position = divmod(self.epoch * self.num_windows + self.position + self.global_batch_size,
                                           self.num_windows)
        return self._rows(self.data, windows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Rank-independent: the same on every rank, loadable with any world size."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "split": self.split,
                "seq_len": self.seq_len, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        for key in ("split", "seq_len", "num_windows"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise DataError(f"loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r}; "
                                f"it was saved for different data or settings")
        if not 0 <= state["position"] < self.num_windows:
            raise DataError(f"loader state position {state['position']} is outside [0, {self.num_windows})")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._order = None

    def val_batches(self, n: int, split: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Up to n batches of this rank's rows over `split` in stream order (no shuffling), the same on
        every call; fewer when the split holds fewer than n global batches."""
        data = self.data if split == self.split else TokenSplit(self.data_dir, split, self.manifest)
        windows = data.windows(self.seq_len)
        available = windows // self.global_batch_size
        if available == 0:
            raise DataError(f"{self.data_dir}: split {split!r} has {windows} sequences of {self.seq_len} + 1 tokens, "
                            f"fewer than one global batch of {self.global_batch_size}")
        for k in range(min(n, available)):
            first = k * self.global_batch_size + self.rank * self.batch_size
            yield self._rows(data, range(first, first + self.batch_size))

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes per token of a split: bits per byte = loss per token / ln 2 / bytes_per_token."""
        value = self.manifest["splits"].get(split, {}).get("bytes_per_token")
        if not value:
            raise DataError(f"{self.data_dir}: manifest has no bytes_per_token for split {split!r}")
        return float(value)
