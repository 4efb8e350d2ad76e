"""Batches of (input, target) windows from a token file, with a small resumable state.

The token stream is cut into non-overlapping windows of seq_len + 1 tokens. Each epoch visits the
windows in an order drawn from (seed, epoch), so the state is two integers: no RNG object needs
saving, and a resumed run sees exactly the batches an uninterrupted one would. With several data-
parallel ranks, rank r takes every world-th window of the epoch's order.
"""

from __future__ import annotations

import numpy as np
import torch

from moelab.errors import MoelabError


class BatchLoader:
    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1):
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world = world
        self.num_windows = (len(tokens) - 1) // seq_len
        needed = batch_size * world
        if self.num_windows < needed:
            raise MoelabError(
                f"the training data has {len(tokens):,} tokens: fewer than one batch of {needed} x {seq_len + 1} "
                "tokens; use more data or a smaller train.batch_size / data.seq_len"
            )
        self.epoch = 0
        self.index = 0  # windows of this rank's order already used in this epoch
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def batches_per_epoch(self) -> int:
        return (self.num_windows // self.world) // self.batch_size

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            # NOTE (distributed): every rank gets the same number of windows (the last
            # num_windows % world of the order are left out), so that all ranks start a new epoch
            # at the same step, exactly when one process reading the global batch would.
            usable = self.num_windows - self.num_windows % self.world
            self._order = rng.permutation(self.num_windows)[:usable][self.rank :: self.world]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len] int64; targets are inputs shifted by one."""
        order = self._epoch_order()
        if self.index + self.batch_size > len(order):
            self.epoch += 1
            self.index = 0
            order = self._epoch_order()
        windows = order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return self._gather(windows)

    def skip(self, batches: int) -> None:
        """Advance past `batches` batches without reading them (used after a rollback)."""
        for _ in range(batches):
            order = self._epoch_order()
            if self.index + self.batch_size > len(order):
                self.epoch += 1
                self.index = 0
            self.index += self.batch_size

    def _gather(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[w * T : w * T + T + 1], dtype=np.int64) for w in windows])
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_windows": self.num_windows,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world": self.world,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_windows", "batch_size", "seq_len"):
            if int(state[key]) != getattr(self, key):
                raise MoelabError(
                    f"the checkpoint's data loader had {key} = {state[key]}, this run has {getattr(self, key)}: "
                    "the data or its settings changed since the checkpoint"
                )
        if int(state.get("world", 1)) != self.world:
            # A different data-parallel size: continue from the same global position.
            used = int(state["index"]) * int(state.get("world", 1))
            self.epoch, self.index = int(state["epoch"]), used // self.world
        else:
            self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of validation batches: windows spread evenly over the whole validation stream."""
    num_windows = (len(tokens) - 1) // seq_len
    if num_windows < 1:
        raise MoelabError(
            f"the validation data has {len(tokens):,} tokens: fewer than one window of {seq_len + 1}; "
            "use more data, a larger data.val_fraction or a smaller data.seq_len"
        )
    count = min(num_windows, batch_size * max_batches)
    windows = np.linspace(0, num_windows - 1, count).round().astype(np.int64)
    rows = np.stack([np.asarray(tokens[w * seq_len : w * seq_len + seq_len + 1], dtype=np.int64) for w in windows])
    data = torch.from_numpy(rows)
    return [(data[i : i + batch_size, :-1], data[i : i + batch_size, 1:]) for i in range(0, count, batch_size)]
