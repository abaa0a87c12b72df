"""The batch engine without HTTP: batched drafting equals per-row drafting, batched rejection
sampling reproduces the exact target distribution, and the speculation policy's choices."""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chisquare

import specdec
from serving_support import make_pair
from specdec.drafters.base import DraftContext, DraftProposal, TargetOutput
from specdec.drafters.draft_model import DraftModelDrafter
from specdec.drafters.hybrid import HybridDrafter
from specdec.drafters.ngram import NgramDrafter
from specdec.drafters.vocab import DraftVocab
from specdec.sampling import SamplingParams
from specdec.serving.batch_draft import BatchDraftModel, DraftRow
from specdec.serving.batch_engine import BatchEngine, EngineEvent, EngineRequest
from specdec.serving.metrics import ServerMetrics
from specdec.serving.policy import SpeculationPolicy
from specdec.verify.chain import VerifyResult


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[specdec.LoadedModel, specdec.LoadedModel]:
    target_path, draft_path = make_pair(tmp_path_factory.mktemp("engine"))
    return specdec.load_model(target_path, dtype="float32"), specdec.load_model(draft_path, dtype="float32")


@pytest.mark.parametrize("reduced", [False, True], ids=["full-vocab", "draft-vocab"])
def test_batched_drafting_equals_per_row_drafting(pair, reduced: bool) -> None:  # type: ignore[no-untyped-def]
    """Ragged histories (different lengths, acceptances, skipped steps) give the same drafts,
    with the whole vocabulary or a reduced draft vocabulary."""
    _, draft = pair
    rng = random.Random(0)
    greedy = SamplingParams()
    vocab = DraftVocab(draft, list(range(0, draft.config.vocab_size, 2))) if reduced else None
    batched = BatchDraftModel(draft, 4, vocab)
    batched.allocate(3, 128)
    sequences = [[5, 9, 17, 30, 2], [40, 41], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
    singles = [DraftModelDrafter(draft, 4, draft_vocab=vocab) for _ in sequences]
    for row, (seq, single) in enumerate(zip(sequences, singles, strict=True)):
        single.prefill(seq, TargetOutput())
        batched.prefill(row, seq, TargetOutput())
    generator = torch.Generator()
    for step in range(8):
        limits = [rng.choice([0, 1, 2, 4]) if step % 3 else 4 for _ in sequences]
        rows = [
            DraftRow(r, s, greedy, generator, k)
            for r, (s, k) in enumerate(zip(sequences, limits, strict=True))
        ]
        proposals = batched.propose(rows)
        for row, (seq, single, k) in enumerate(zip(sequences, singles, limits, strict=True)):
            if k == 0:
                assert row not in proposals
                continue
            expected = single.propose(DraftContext(seq, greedy, k, generator))
            assert proposals[row].tokens.tolist() == expected.tokens.tolist(), (step, row)
            drafts = expected.tokens.tolist()
            assert not reduced or all(t % 2 == 0 for t in drafts)
            accepted = rng.randint(0, k)
            result = VerifyResult(drafts[:accepted] + [rng.randrange(100)], accepted, k, accepted == k)
            single.on_verified(result)
            batched.on_verified(row, len(seq), accepted)
            seq += result.tokens


def run_engine(engine: BatchEngine, requests: list[EngineRequest]) -> None:
    pending = list(requests)
    while pending or engine.num_active:
        while pending and engine.num_free:
            engine.add(pending.pop())
        engine.step()


@pytest.mark.parametrize("drafting", ["batched", "batched-draft-vocab", "per-row-tree"])
def test_batched_sampling_reproduces_the_target_distribution(pair, drafting: str) -> None:  # type: ignore[no-untyped-def]
    """Rows sampled together (temperature 1; 3 new tokens, so the first step verifies 2 drafts,
    as a chain or as a width-2 tree) follow the target's exact distribution at generated
    positions 1 and 2 (chi-square test, bins of expected count >= 5)."""
    target, draft = pair
    prompt = target.tokenizer.encode("the draft")
    with torch.inference_mode():
        cache = target.new_cache(1, 64)
        probs1 = target(torch.tensor([prompt]), torch.arange(len(prompt)), cache)[0, -1].softmax(-1)  # (V,)
        V = probs1.shape[0]
        both = torch.tensor([prompt + [x] for x in range(V)])  # (V, n+1)
        cache = target.new_cache(V, 64)
        probs2_given_1 = target(both, torch.arange(len(prompt) + 1), cache)[:, -1].softmax(-1)  # (V, V)
        probs2 = probs1 @ probs2_given_1  # (V,)
    outputs: list[list[int]] = []
    samples = 800 if drafting == "batched" else 500
    requests = []
    for seed in range(samples):
        tokens: list[int] = []

        def emit(event: EngineEvent, tokens: list[int] = tokens) -> None:
            tokens += event.token_ids
            if event.finish_reason:
                outputs.append(tokens)

        requests.append(EngineRequest(prompt, 3, SamplingParams(1.0), emit, seed=seed, ignore_eos=True))
    vocab = DraftVocab(draft, list(range(0, V, 2))) if drafting == "batched-draft-vocab" else None
    source = (
        BatchDraftModel(draft, 3, vocab)
        if drafting != "per-row-tree"
        else (lambda: DraftModelDrafter(draft, 3, 2))
    )
    engine = BatchEngine(target, source, 16, ServerMetrics("t"), adaptive_draft_tokens=False)
    run_engine(engine, requests)
    assert len(outputs) == samples and all(len(o) == 3 for o in outputs)
    for position, exact in ((0, probs1), (1, probs2)):
        counts = torch.bincount(torch.tensor([o[position] for o in outputs]), minlength=V).double()
        expected = exact.double() * samples
        big = expected >= 5
        observed = torch.cat([counts[big], counts[~big].sum()[None]])
        wanted = torch.cat([expected[big], expected[~big].sum()[None]])
        wanted *= observed.sum() / wanted.sum()
        assert chisquare(observed.numpy(), wanted.numpy()).pvalue > 1e-3, position
    metrics = engine.metrics
    assert 0 < metrics.accepted_tokens < metrics.draft_tokens  # both acceptance and recovery ran


def test_policy_speculates_when_cheap_and_stops_when_compute_bound() -> None:
    cheap = SpeculationPolicy(4)
    for tokens in (1, 5, 20, 40):
        cheap.observe_pass(tokens, 0.010 + 0.00001 * tokens)  # memory-bound: flat cost
    for _ in range(50):
        cheap.observe_acceptance(4, 3)
    assert cheap.choose(4) == 4

    bound = SpeculationPolicy(4)
    for tokens in (1, 5, 20, 40, 80):
        bound.observe_pass(tokens, 0.001 * tokens)  # compute-bound: cost proportional to tokens
    for _ in range(50):
        bound.observe_acceptance(4, 0)
    assert bound.choose(16) == 0
    assert bound.expected_tokens(0) == 1.0


class TreeCounter(DraftModelDrafter):
    trees = 0

    def propose(self, ctx: DraftContext) -> DraftProposal:
        proposal = super().propose(ctx)
        TreeCounter.trees += proposal.tree is not None and proposal.tree.num_nodes > 1
        return proposal


def test_tree_and_chain_rows_in_one_batch_equal_plain_greedy(pair) -> None:  # type: ignore[no-untyped-def]
    target, draft = pair
    kinds = iter(range(10**6))
    hybrids: list[HybridDrafter] = []

    def factory():  # type: ignore[no-untyped-def]
        i = next(kinds)
        if i % 4 == 0:
            return TreeCounter(draft, 3, tree_width=2)
        if i % 4 == 3:
            hybrids.append(HybridDrafter(DraftModelDrafter(draft, 3)))
            return hybrids[-1]
        return NgramDrafter(3, num_branches=2) if i % 4 == 1 else DraftModelDrafter(draft, 3)

    texts = (
        "the model",
        "a fast draft",
        "red green blue",
        "for while do for while do for while",  # repeats, on the hybrid row (the 4th)
        "print value",
        "one two",
        "hello",
        "if else",
    )
    prompts = [target.tokenizer.encode(p) for p in texts]
    outputs: dict[int, list[int]] = {}
    requests = []
    for i, ids in enumerate(prompts):

        def emit(event: EngineEvent, i: int = i) -> None:
            outputs.setdefault(i, []).extend(event.token_ids)

        requests.append(EngineRequest(ids, 24 + i, SamplingParams(), emit))
    engine = BatchEngine(target, factory, 4, ServerMetrics("t"), adaptive_draft_tokens=False)  # one row each
    run_engine(engine, requests)
    plain = specdec.SpeculativeGenerator(target)
    for i, ids in enumerate(prompts):
        assert outputs[i] == plain.generate(ids, max_new_tokens=24 + i).token_ids, i
    assert TreeCounter.trees > 0
    assert sum(h.looked_up for h in hybrids) > 0 and sum(h.drafted for h in hybrids) > 0


@pytest.mark.parametrize(
    "device, dtype",
    [("cpu", "float32"), ("cpu", "bfloat16")] + ([("cuda", "float32")] if torch.cuda.is_available() else []),
)  # (no skip)
def test_demo_pair_in_a_batch_equals_plain_greedy(device: str, dtype: str) -> None:
    """The shipped pair: 8 rows with the batched draft model equal plain decoding, on the CPU
    (float32, and bfloat16: rows rounded to bfloat16, dot products from 3 rows, their FMA twin
    for 1-2) and, where there is one, a GPU (scripts/gpu_check.sh runs it there)."""
    from specdec.serving.loadtest import PROMPTS

    target = specdec.load_model("demo-target", dtype=dtype, device=device)
    draft = specdec.load_model("demo-draft", dtype=dtype, device=device)
    prompts = [target.tokenizer.encode(p) for p in PROMPTS[:8]]
    outputs: dict[int, list[int]] = {}
    requests = []
    for i, ids in enumerate(prompts):

        def emit(event: EngineEvent, i: int = i) -> None:
            outputs.setdefault(i, []).extend(event.token_ids)

        requests.append(EngineRequest(ids, 24, SamplingParams(), emit, ignore_eos=True))
    engine = BatchEngine(
        target, BatchDraftModel(draft, 4), 8, ServerMetrics("t"), 512, adaptive_draft_tokens=False
    )
    run_engine(engine, requests)
    plain = specdec.SpeculativeGenerator(target)
    for i, ids in enumerate(prompts):
        assert outputs[i] == plain.generate(ids, max_new_tokens=24, ignore_eos=True).token_ids, i
    assert engine.metrics.accepted_tokens > 0


def test_engine_passes_run_without_autograd(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every target and draft pass of a step runs in inference mode (no autograd bookkeeping,
    and the one-call CPU forward, which needs it, applies)."""
    target, draft = pair
    modes: list[bool] = []
    for model in (target, draft):
        forward = model.module.forward

        def recording(*args, forward=forward, **kwargs):  # type: ignore[no-untyped-def]
            modes.append(torch.is_inference_mode_enabled())
            return forward(*args, **kwargs)

        monkeypatch.setattr(model.module, "forward", recording)
    engine = BatchEngine(target, BatchDraftModel(draft, 3), 2, ServerMetrics("t"))
    run_engine(engine, [EngineRequest([1, 2, 3], 6, SamplingParams(0.0), lambda e: None, ignore_eos=True)])
    assert len(modes) > 3 and all(modes)


def test_first_speculative_step_after_plain_steps_is_reported_cold(pair) -> None:  # type: ignore[no-untyped-def]
    """The batched draft model catches up on skipped tokens in the first speculative step after
    plain ones; the engine tells the policy so (``warm=False``), and only then."""
    target, draft = pair
    engine = BatchEngine(target, BatchDraftModel(draft, 2), 2, ServerMetrics("t"))
    plan = iter([0, 0, 0, 2, 2, 0] + [2] * 40)
    seen: list[tuple[int, bool]] = []
    engine.policy.choose = lambda batch_size: next(plan)  # type: ignore[method-assign]
    engine.policy.observe_step = lambda b, k, tokens, s, warm=True: seen.append((k, warm))  # type: ignore[method-assign]
    run_engine(engine, [EngineRequest([1, 2, 3], 40, SamplingParams(0.0), lambda e: None, ignore_eos=True)])
    assert seen[:8] == [
        (0, True),
        (0, True),
        (0, True),
        (2, False),
        (2, True),
        (0, True),
        (2, False),
        (2, True),
    ]


def test_draft_model_costs_nothing_while_the_server_does_not_speculate(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The batched draft model reads a new request's prompt at the row's first proposal, not at
    admission: with K = 0 on every step it never runs. When speculation starts, the row catches
    up alone and drafts exactly what a per-row drafter does."""
    target, draft = pair
    calls: list[tuple[int, ...]] = []
    forward = draft.module.forward

    def recording(tokens, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(tuple(tokens.shape))
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(draft.module, "forward", recording)
    engine = BatchEngine(target, BatchDraftModel(draft, 2), 2, ServerMetrics("t"))
    engine.policy.choose = lambda batch_size: 0  # type: ignore[method-assign]
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    run_engine(engine, [EngineRequest(prompt, 6, SamplingParams(0.0), lambda e: None, ignore_eos=True)])
    assert calls == []
    batched = BatchDraftModel(draft, 2)
    batched.allocate(1, 64)
    batched.prefill(0, prompt, TargetOutput())
    assert calls == []
    proposal = batched.propose([DraftRow(0, prompt, SamplingParams(), torch.Generator(), 2)])[0]
    assert calls[0] == (1, len(prompt) - 1)  # the catch-up pass of the row alone
    single = DraftModelDrafter(draft, 2)
    single.prefill(prompt, TargetOutput())
    expected = single.propose(DraftContext(prompt, SamplingParams(), 2, torch.Generator()))
    assert proposal.tokens.tolist() == expected.tokens.tolist()


def test_serve_builds_the_batched_draft_model_with_the_draft_vocabulary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import argparse

    from specdec.drafters.vocab import write_draft_vocab
    from specdec.serving.command import make_drafting

    target_path, draft_path = make_pair(tmp_path)
    V = specdec.load_model(target_path, dtype="float32").config.vocab_size
    write_draft_vocab(target_path, list(range(V))[::-1], 1, "test")  # most frequent: the highest ids
    target = specdec.load_model(target_path, dtype="float32")
    args = argparse.Namespace(drafter="draft", draft=str(draft_path), dtype="float32", device="cpu",
                              num_draft_tokens=3, heads=None)  # fmt: skip
    for size, expected in ((None, V // 4), (10, 10), (0, None)):
        drafting = make_drafting(argparse.Namespace(**vars(args), draft_vocab=size), target)
        assert isinstance(drafting, BatchDraftModel)
        vocab = drafting.draft_vocab
        assert (None if vocab is None else len(vocab)) == expected
        if vocab is not None:  # the ranking's first ids, scored by the draft's own lm_head rows
            assert vocab.ids.tolist() == list(range(V - expected, V))
            assert torch.equal(vocab.weight, drafting.model.module.lm_head.weight[vocab.ids])


def test_fused_eagle_rows_in_a_batch_equal_plain_greedy(pair) -> None:  # type: ignore[no-untyped-def]
    """EAGLE-3 heads on some rows: the batched verify pass gives them the target's layer outputs
    with its hidden states (their chains and trees), and every row equals plain greedy. Heads
    that read different layers cannot share one pass: refused."""
    from helpers import random_head
    from specdec.drafters.eagle import EagleDrafter

    target, _ = pair
    head = random_head("eagle", target, seed=4, feature_layers=(0,))
    kinds = iter(range(10**6))

    def factory():  # type: ignore[no-untyped-def]
        i = next(kinds)
        if i % 3 == 2:
            return NgramDrafter(3)
        return EagleDrafter(target, head, num_draft_tokens=3, tree_width=1 + i % 3, draft_vocab=0)

    prompts = [
        target.tokenizer.encode(p) for p in ("the model", "a fast draft", "red green blue", "print value")
    ]
    outputs: dict[int, list[int]] = {}
    requests = []
    for i, ids in enumerate(prompts):

        def emit(event: EngineEvent, i: int = i) -> None:
            outputs.setdefault(i, []).extend(event.token_ids)

        requests.append(EngineRequest(ids, 20, SamplingParams(), emit))
    engine = BatchEngine(target, factory, 3, ServerMetrics("t"), adaptive_draft_tokens=False)
    assert engine.feature_layers == (0,)
    run_engine(engine, requests)
    plain = specdec.SpeculativeGenerator(target)
    for i, ids in enumerate(prompts):
        assert outputs[i] == plain.generate(ids, max_new_tokens=20).token_ids, i
    other = random_head("eagle", target, seed=4, feature_layers=(1,))
    mixed = iter([head, other])
    with pytest.raises(ValueError, match="different target layers"):
        BatchEngine(target, lambda: EagleDrafter(target, next(mixed), draft_vocab=0), 2, ServerMetrics("t"))
