"""Preallocated key/value cache written by position (as in gpt-fast).

The cache is a pair of tensors ``[L, B, H, S, D]`` allocated once. A forward pass writes the
keys and values of its tokens into the *slots* it is given; attention reads slots
``0 .. kv_len-1`` under a mask. Rolling back rejected draft tokens is therefore free: the
engine lowers ``lengths`` and the stale slots are overwritten by the next write (a query only
ever sees slots the mask allows, so stale entries are never read).

Tree verification writes N tree nodes into consecutive slots; ``compact`` then moves the
accepted path's entries to the front of that block so the row is a plain chain again.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for every layer, batch row and slot.

    ``lengths[b]`` is the number of committed slots of row ``b``. It is host-side bookkeeping
    owned by the engine; ``write`` never changes it.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, S, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, S, D)
        self.max_seq_len = max_seq_len
        self.lengths = [0] * batch_size

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``(B, H, T, D)`` of ``layer`` at ``slots`` ``(B, T)``."""
        B = k.shape[0]
        if B == 1:
            self.k[layer, 0].index_copy_(1, slots[0], k[0])
            self.v[layer, 0].index_copy_(1, slots[0], v[0])
            return
        H = k.shape[1]
        b_idx = torch.arange(B, device=k.device)[:, None, None]  # (B, 1, 1)
        h_idx = torch.arange(H, device=k.device)[None, :, None]  # (1, H, 1)
        s_idx = slots[:, None, :]  # (B, 1, T)
        self.k[layer][b_idx, h_idx, s_idx] = k
        self.v[layer][b_idx, h_idx, s_idx] = v

    def read(self, layer: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots ``0 .. kv_len-1``, each ``(B, H, kv_len, D)``."""
        return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]

    def truncate(self, length: int, row: int = 0) -> None:
        """Roll row ``row`` back to ``length`` committed slots (rejected drafts are dropped)."""
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"cannot truncate to {length} (capacity {self.max_seq_len})")
        self.lengths[row] = length

    def compact(self, start: int, keep: list[int], row: int = 0) -> None:
        """Keep the slots ``start + i`` for ``i`` in ``keep`` (in order) at ``start, start+1, ...``.

        Used after tree verification: ``keep`` is the accepted path's node indices. The row's
        length becomes ``start + len(keep)``.
        """
        if keep != list(range(len(keep))):
            src = torch.tensor([start + i for i in keep], device=self.k.device)
            dst = torch.arange(start, start + len(keep), device=self.k.device)
            # Gather first, then scatter: source and destination ranges may overlap.
            self.k[:, row, :, dst] = self.k[:, row, :, src]
            self.v[:, row, :, dst] = self.v[:, row, :, src]
        self.lengths[row] = start + len(keep)

    def reset(self) -> None:
        self.lengths = [0] * self.batch_size
