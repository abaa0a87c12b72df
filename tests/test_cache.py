"""KV cache rollback and compaction leave the model in the state a fresh decode would."""

from __future__ import annotations

import torch

from specdec import load_model


def test_truncate_then_decode_equals_fresh_decode(target_path):
    model = load_model(target_path, dtype="float32")
    ids = torch.tensor([[5, 9, 2, 33, 7, 1, 60, 4]])
    cache = model.new_cache(max_seq_len=32)
    model(ids[:, :6], torch.arange(6), cache)
    model(torch.tensor([[11, 12, 13]]), torch.arange(6, 9), cache)  # drafts, then rejected
    cache.truncate(6)
    rolled_back = model(ids[:, 6:], torch.arange(6, 8), cache)
    fresh = model(ids, torch.arange(8), model.new_cache(max_seq_len=32))[:, 6:]
    torch.testing.assert_close(rolled_back, fresh, atol=1e-5, rtol=0)


def test_compact_moves_kept_slots_into_place(target_path):
    model = load_model(target_path, dtype="float32")
    cache = model.new_cache(max_seq_len=16)
    cache.k[:, 0, :, :, 0] = torch.arange(16).float()
    cache.v[:, 0, :, :, 0] = -torch.arange(16).float()
    cache.compact(start=4, keep=[1, 3, 4])
    assert cache.lengths[0] == 7
    assert cache.k[0, 0, 0, 4:7, 0].tolist() == [5.0, 7.0, 8.0]
    assert cache.v[1, 0, 1, 4:7, 0].tolist() == [-5.0, -7.0, -8.0]
    assert cache.k[0, 0, 0, :4, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_compact_then_decode_equals_fresh_decode(target_path):
    model = load_model(target_path, dtype="float32")
    prefix = torch.tensor([[3, 8, 1, 20]])
    cache = model.new_cache(max_seq_len=32)
    model(prefix, torch.arange(4), cache)
    # Write three chain tokens at slots 4..6 with garbage at slot 4, keep slots 5 and 6 only if
    # they were written at their final positions: write 40, 41 at slots 5, 6 with positions 4, 5.
    model(torch.tensor([[90]]), torch.tensor([4]), cache)  # slot 4: rejected sibling
    model(torch.tensor([[40, 41]]), torch.tensor([4, 5]), cache, cache_slots=torch.tensor([[5, 6]]),
          attn_mask=torch.tensor([[[True] * 4 + [False, True, False], [True] * 4 + [False, True, True]]]))
    cache.compact(start=4, keep=[1, 2])
    got = model(torch.tensor([[7]]), torch.tensor([6]), cache)
    fresh = model(torch.tensor([[3, 8, 1, 20, 40, 41, 7]]), torch.arange(7), model.new_cache(max_seq_len=32))[:, -1:]
    torch.testing.assert_close(got, fresh, atol=1e-5, rtol=0)
