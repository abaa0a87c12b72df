"""Graphed decoding passes (specdec.models.cuda_graphs) give plain decoding's tokens.

On a machine without a GPU the graphs are recorded by ``eager_capture``, which replays by
running the static-shape pass again into the same output tensors: that checks the static
inputs, the slot buckets, the masks and the bookkeeping. Where CUDA is present the same tests
also run on the GPU with real CUDA graphs (the device check in scripts/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch

from helpers import random_head
from specdec import (
    DraftModelDrafter,
    EagleDrafter,
    EarlyExitDrafter,
    SpeculativeGenerator,
    load_model,
    options,
)
from specdec.drafters.heads import EagleHead
from specdec.models import cuda_graphs
from specdec.models.cuda_graphs import GraphedPasses, GraphTable, cuda_capture, eager_capture

PROMPTS = [[5], [1, 2, 3], list(range(40, 60))]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def graphed(model, device: str):  # type: ignore[no-untyped-def]
    """``model`` with graphed passes: CUDA graphs on a GPU, their eager stand-in on the CPU."""
    if device == "cpu":
        model.graphs = GraphedPasses(model.module, eager_capture)
        # The one-call greedy chain would skip the passes under test: take the drafter's loop.
        model.module.draft_chain = lambda *args, **kwargs: None
    assert model.graphs is not None
    return model


def loaded(path, device: str, graphs: bool, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(options, "_current", options.Options(cuda_graphs=graphs))
    model = load_model(path, dtype="float32", device=device)
    return graphed(model, device) if graphs else model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bucket", [16, 256])
def test_graphed_passes_give_plain_greedy_tokens(target_path, good_draft_path, device, bucket, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "SLOT_BUCKET", bucket)  # 16: passes cross many buckets
    eager_target = loaded(target_path, device, False, monkeypatch)
    assert eager_target.graphs is None
    target = loaded(target_path, device, True, monkeypatch)
    draft = loaded(good_draft_path, device, True, monkeypatch)
    plain = SpeculativeGenerator(eager_target)
    graphed_plain = SpeculativeGenerator(target)
    speculative = SpeculativeGenerator(target, DraftModelDrafter(draft, 4))
    accepted = 0
    for prompt in PROMPTS:
        ref = plain.generate(prompt, max_new_tokens=60).token_ids
        assert graphed_plain.generate(prompt, max_new_tokens=60).token_ids == ref
        out = speculative.generate(prompt, max_new_tokens=60)
        assert out.token_ids == ref
        accepted += out.stats.accepted_tokens
    assert accepted > 0
    assert target.graphs.captures > 0 and draft.graphs.captures > 0
    # Shapes repeat: once the caches have their final size (the first round grew the engine's
    # for the longest prompt, and a new cache records its own graphs), a round records nothing.
    counts = []
    for _ in range(2):
        for prompt in PROMPTS:
            assert (
                speculative.generate(prompt, max_new_tokens=60).token_ids
                == plain.generate(prompt, max_new_tokens=60).token_ids
            )
        counts.append((target.graphs.captures, draft.graphs.captures))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("device", DEVICES)
def test_graphed_pass_matches_the_eager_pass(target_path, device, monkeypatch):
    """Logits and hidden states of a replayed verify pass equal the eager pass's (float32 round-off)."""
    target = loaded(target_path, device, True, monkeypatch)
    prompt = torch.arange(1, 30, device=device)[None]  # (1, 29)
    for replay in range(3):  # the first call records, the others replay
        cache = target.new_cache(1, 128)
        target(prompt, torch.arange(29, device=device), cache, num_logits=0)
        tokens = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(replay)).to(device)
        pos = torch.arange(29, 34, device=device)
        want_logits, want_hidden = target.module(tokens, pos, cache, return_hidden=True, kv_len=34)
        got_logits, got_hidden = target.step(tokens, pos, cache, return_hidden=True, kv_len=34)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_hidden, want_hidden, rtol=1e-5, atol=1e-5)
        # an EAGLE-3 verify pass: the target's layer outputs with its hidden states, graphed too
        cache2 = target.new_cache(1, 128)
        target(prompt, torch.arange(29, device=device), cache2, num_logits=0)
        got_logits, got_rows = target.step(
            tokens, pos, cache2, return_hidden=True, kv_len=34, feature_layers=(0,)
        )
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_rows[..., -want_hidden.shape[-1] :], want_hidden, rtol=1e-5, atol=1e-5)
    # One graph per cache and pass: six caches, six recordings (a dropped cache drops its graphs).
    assert target.graphs.captures == 6


def record_proposals(drafter, seen: list[list[int]]) -> None:  # type: ignore[no-untyped-def]
    propose = drafter.propose

    def record(ctx):  # type: ignore[no-untyped-def]
        proposal = propose(ctx)
        seen.append(proposal.tokens.tolist())
        return proposal

    drafter.propose = record


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["eagle", "early-exit"])
def test_graphed_head_drafters_draft_what_their_eager_loops_draft(target_path, device, method, monkeypatch):
    """The EAGLE head's and early exit's chain passes, replayed from graphs, give the eager
    loop's drafts (greedy and sampled) and plain greedy output; small slot buckets make the
    passes cross buckets."""
    monkeypatch.setattr(cuda_graphs, "SLOT_BUCKET", 16)
    # The loops under test, not the one-call C++ chains the CPU would take:
    monkeypatch.setattr(EagleHead, "draft_chain", lambda *args, **kwargs: None)
    monkeypatch.setattr(EarlyExitDrafter, "_one_call", lambda self: False)
    target = load_model(target_path, dtype="float32", device=device)
    settings = {"exit_layer": 1} if method == "early-exit" else {}
    head = random_head(method, target, seed=0, **settings).to(device)
    make = EagleDrafter if method == "eagle" else EarlyExitDrafter
    drafters = {name: make(target, head, num_draft_tokens=4) for name in ("eager", "graphed")}
    drafters["eager"].graphs = None
    drafters["graphed"].graphs = GraphTable(eager_capture if device == "cpu" else cuda_capture)
    proposals: dict[str, list[list[int]]] = {name: [] for name in drafters}
    for name, drafter in drafters.items():
        record_proposals(drafter, proposals[name])
    plain = SpeculativeGenerator(target)
    for prompt in PROMPTS:
        ref = plain.generate(prompt, max_new_tokens=40).token_ids
        for name, drafter in drafters.items():
            gen = SpeculativeGenerator(target, drafter)
            assert gen.generate(prompt, max_new_tokens=40).token_ids == ref, name
            gen.generate(prompt, max_new_tokens=20, temperature=0.8, seed=3)
    assert proposals["graphed"] == proposals["eager"]
    assert drafters["graphed"].graphs.captures > 0
    if device == "cpu":
        assert make(target, head).graphs is None  # graphs only on CUDA


def test_which_passes_are_graphed():
    applies = GraphedPasses.applies
    one = torch.zeros(1, 5, dtype=torch.long)
    assert applies(one, {"kv_len": 9})
    assert applies(one, {"kv_len": 9, "return_hidden": True, "num_logits": 1})
    assert applies(one, {"kv_len": 9, "return_hidden": True, "feature_layers": (0, 2)})
    assert not applies(one, {})  # kv_len unknown
    assert not applies(one, {"kv_len": 9, "attn_mask": None})  # tree passes bring their own mask
    assert not applies(torch.zeros(2, 5, dtype=torch.long), {"kv_len": 9})  # a batch
    assert not applies(
        torch.zeros(1, cuda_graphs.MAX_TOKENS + 1, dtype=torch.long), {"kv_len": 99}
    )  # prefill


def test_graphs_only_on_cuda_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(options, "_current", options.Options())
    assert not cuda_graphs.enabled(torch.device("cpu"))
    assert cuda_graphs.enabled(torch.device("cuda"))
    monkeypatch.setattr(options, "_current", options.Options(cuda_graphs=False))
    assert not cuda_graphs.enabled(torch.device("cuda"))
