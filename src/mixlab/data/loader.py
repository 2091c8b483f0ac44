"""The resumable loader: every batch is a pure function of (seed, step, rank, world size).

The token shards are cut into fixed windows of ``seq_len + 1`` tokens starting every ``seq_len``
tokens (inputs are the first ``seq_len``, targets the last ``seq_len``). Training samples are an
endless sequence of epochs; epoch ``e`` visits every window once in the order of a permutation
seeded by ``(seed, e)``. Optimizer step ``s`` consumes global samples ``s*B .. s*B+B-1``
(``B`` = global batch size) and rank ``r`` of ``W`` takes every ``W``-th of them starting at ``r``.

So the global batch of a step does not depend on the world size, ranks never share a sample, and
the loader's whole state is the next step: resuming (even with a different number of ranks)
continues exactly where the run stopped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["TokenWindows", "TrainLoader", "eval_batches"]


class TokenWindows:
    """Fixed windows of ``seq_len + 1`` tokens over one or more 1-D token arrays."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int) -> None:
        self.arrays = arrays
        self.seq_len = seq_len
        counts = [max(0, (len(a) - 1) // seq_len) for a in arrays]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n

    def get(self, indices: np.ndarray) -> torch.Tensor:
        """Windows ``indices`` as int64 ``[len(indices), seq_len + 1]``."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        for row, (idx, s) in enumerate(zip(indices.tolist(), shard.tolist())):
            start = (idx - int(self.offsets[s])) * self.seq_len
            out[row] = self.arrays[s][start : start + self.seq_len + 1]
        return torch.from_numpy(out)


class TrainLoader:
    """Training batches: ``batch(step) -> [batch_size // world_size, seq_len + 1]`` int64 tokens."""

    def __init__(
        self,
        arrays: list[np.ndarray],
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} must be a multiple of the world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.windows = TokenWindows(arrays, seq_len)
        if len(self.windows) == 0:
            total = sum(len(a) for a in arrays)
            raise ValueError(
                f"the training data ({total} tokens) is shorter than one window of data.seq_len+1={seq_len + 1} "
                "tokens; use more text or a smaller data.seq_len"
            )
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0  # the next step to load; the loader's whole state
        self._perms: dict[int, np.ndarray] = {}

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perms[epoch] = rng.permutation(len(self.windows))
        return self._perms[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """Window indices of the whole global batch of ``step`` (all ranks), ``[batch_size]``."""
        n = len(self.windows)
        samples = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        out = np.empty_like(samples)
        epochs = samples // n
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(int(e))[samples[sel] % n]
        return out

    def batch(self, step: int) -> torch.Tensor:
        """This rank's tokens of ``step``: int64 ``[batch_size // world_size, seq_len + 1]``."""
        return self.windows.get(self.global_indices(step)[self.rank :: self.world_size])

    def next(self) -> torch.Tensor:
        """The batch of the current step, then advance."""
        b = self.batch(self.step)
        self.step += 1
        return b

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / len(self.windows)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_windows": len(self.windows),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state['step']``; the data, seq_len and global batch must be those of the saved run."""
        mismatch = [
            f"{k}: saved {state[k]} != now {v}"
            for k, v in (
                ("seed", self.seed),
                ("seq_len", self.seq_len),
                ("batch_size", self.batch_size),
                ("n_windows", len(self.windows)),
            )
            if k in state and state[k] != v
        ]
        if mismatch:
            raise ValueError(
                "the checkpoint's data order does not match this run (" + "; ".join(mismatch) + "); "
                "resume with the run's own data / seq_len / batch_size, or start fresh with train.resume=never"
            )
        self.step = int(state["step"])


def eval_batches(
    arrays: list[np.ndarray], seq_len: int, batch_size: int, n_batches: int, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """A fixed set of held-out batches: ``n_batches * batch_size`` windows spread evenly over the
    held-out tokens (fewer if there are fewer windows), each batch split over ranks like training."""
    windows = TokenWindows(arrays, seq_len)
    if len(windows) == 0:
        return []
    want = min(len(windows), n_batches * batch_size)
    idx = np.unique(np.linspace(0, len(windows) - 1, num=want).round().astype(np.int64))
    out = []
    for start in range(0, len(idx), batch_size):
        mine = idx[start : start + batch_size][rank::world_size]
        if len(mine):
            out.append(windows.get(mine))
    return out
