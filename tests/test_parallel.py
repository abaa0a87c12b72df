"""Drafting in parallel with verification (engine/parallel.py): greedy output identical to
sequential speculation and to plain decoding, optimistic windows kept and dropped, the joint
distribution of later tokens (where kept windows draft them) exactly the target's, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import accept_every_draft, save_tiny_llama, small_vocab_trio
from specdec import DraftModelDrafter, SpeculativeGenerator, make_drafter
from specdec.engine.parallel import ParallelSpeculation
from specdec.losslessness import exact_two_token_joint, goodness_of_fit
from specdec.sampling import SamplingParams

PROMPTS = [[5, 17, 3, 9, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]


@pytest.mark.parametrize("draft", ["good", "far"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_equals_sequential_and_plain(models, draft: str, k: int) -> None:
    target = models["target"]
    plain = SpeculativeGenerator(target)
    sequential = SpeculativeGenerator(target, DraftModelDrafter(models[draft], k))
    parallel = SpeculativeGenerator(target, DraftModelDrafter(models[draft], k), parallel=True)
    assert parallel.parallel is not None
    for prompt in PROMPTS:
        for max_new in (1, 2, 7, 40):
            expected = plain.generate(prompt, max_new_tokens=max_new).token_ids
            assert sequential.generate(prompt, max_new_tokens=max_new).token_ids == expected
            out = parallel.generate(prompt, max_new_tokens=max_new)
            assert out.token_ids == expected, (prompt, max_new)
            assert out.stats.new_tokens == len(expected)


def test_optimistic_windows_are_kept_for_a_good_draft_and_dropped_for_a_far_one(models) -> None:
    """The good draft's optimistic windows are used where its whole window and the bonus token
    were right; the far draft's are all but never used; both timelines hold drafts overlapped
    with verify phases."""
    target = models["target"]
    counts = {}
    for draft in ("good", "far"):
        gen = SpeculativeGenerator(target, DraftModelDrafter(models[draft], 1), parallel=True)
        gen.generate(PROMPTS[0], max_new_tokens=60)
        assert gen.parallel is not None
        timeline = gen.parallel.timeline
        counts[draft] = (timeline.kept, timeline.dropped)
        lanes = {(p.lane, p.overlapped) for p in timeline.phases}
        assert {("verify", False), ("draft", True)} <= lanes
        assert all(0 <= p.start <= p.end for p in timeline.phases)
    assert counts["good"][0] >= 3
    assert counts["far"][0] < counts["good"][0] and counts["far"][1] > counts["good"][1]


def test_parallel_needs_a_plain_chain_of_a_draft_model(models) -> None:
    target = models["target"]
    with pytest.raises(ValueError, match="needs a drafter"):
        SpeculativeGenerator(target, None, parallel=True)
    with pytest.raises(ValueError, match="plain chain of a draft model"):
        SpeculativeGenerator(target, make_drafter("ngram", target), parallel=True)
    with pytest.raises(ValueError, match="plain chain of a draft model"):
        SpeculativeGenerator(target, DraftModelDrafter(models["good"], 2, tree_width=2), parallel=True)


def test_the_draft_cache_rewinds_to_the_committed_prefix(models) -> None:
    """Requests in a row on one generator, the second sharing the first's opening: the draft
    chain keeps only the prefix its cache shares with the new tokens."""
    target = models["target"]
    gen = SpeculativeGenerator(target, DraftModelDrafter(models["far"], 4), parallel=True)
    plain = SpeculativeGenerator(target)
    for prompt in ([5, 17, 3, 9], [5, 17, 3, 8], [5, 17]):
        assert (
            gen.generate(prompt, max_new_tokens=30).token_ids
            == plain.generate(prompt, max_new_tokens=30).token_ids
        )


# ---------------------------------------------------------------- sampling: exact distribution
PROMPT = [3, 1, 4]
N = 1500
OFFSET = 2  # the pair tested is the 3rd and 4th generated token


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    return small_vocab_trio(tmp_path_factory.mktemp("parallel-vocab8"))


def exact_later_pair(target, params: SamplingParams) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The exact joint ``(V, V)`` of the generated tokens at ``OFFSET`` and ``OFFSET + 1``: the
    two-token joint after every two-token opening, weighted by that opening's probability."""
    V = target.config.vocab_size
    firsts, opening = exact_two_token_joint(target, PROMPT, params)
    joint = np.zeros((V, V))
    for i, a in enumerate(firsts):
        for b in range(V):
            if opening[i, b] > 0:
                rows, pair = exact_two_token_joint(target, [*PROMPT, int(a), b], params)
                joint[rows] += opening[i, b] * pair
    return joint


def sample_later_pairs(gen: SpeculativeGenerator, **sampling) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    pairs = []
    for seed in range(N):
        ids = gen.generate(PROMPT, max_new_tokens=8, seed=seed, ignore_eos=True, **sampling).token_ids
        pairs.append((ids[OFFSET], ids[OFFSET + 1]))
    return pairs


SETTINGS = [("near", 2, dict(temperature=1.0)), ("far", 1, dict(temperature=0.8, top_k=6))]


@pytest.mark.parametrize("draft,k,sampling", SETTINGS, ids=[f"{d}-k{k}" for d, k, _ in SETTINGS])
def test_parallel_sampling_matches_the_exact_target_distribution(small_vocab, draft, k, sampling) -> None:
    target = small_vocab["target"]
    joint = exact_later_pair(target, SamplingParams(**sampling))
    assert abs(joint.sum() - 1) < 1e-5
    gen = SpeculativeGenerator(target, DraftModelDrafter(small_vocab[draft], k), parallel=True)
    fit = goodness_of_fit(sample_later_pairs(gen, **sampling), np.arange(joint.shape[0]), joint)
    assert fit.pvalue > 1e-3, f"chi-square p = {fit.pvalue:.2e}"
    assert fit.total_variation < 3 * fit.null_total_variation, fit
    assert gen.parallel is not None and gen.parallel.timeline.kept + gen.parallel.timeline.dropped > 0


def test_negative_control_detects_a_lossy_sampler_in_the_parallel_loop(small_vocab, monkeypatch) -> None:
    monkeypatch.setattr("specdec.engine.chain_step.verify_rejection", accept_every_draft)
    target = small_vocab["target"]
    joint = exact_later_pair(target, SamplingParams(1.0))
    gen = SpeculativeGenerator(target, DraftModelDrafter(small_vocab["far"], 2), parallel=True)
    fit = goodness_of_fit(sample_later_pairs(gen, temperature=1.0), np.arange(joint.shape[0]), joint)
    assert not fit.passed and fit.pvalue < 1e-6


def test_the_draft_thread_count_is_its_own(small_vocab) -> None:
    """The worker thread sets its own torch thread count; the caller's stays as it was."""
    import torch

    before = torch.get_num_threads()
    spec = ParallelSpeculation(DraftModelDrafter(small_vocab["near"], 2), draft_threads=1)
    assert spec._worker().submit(torch.get_num_threads).result() == 1
    spec.close()
    assert torch.get_num_threads() == before


def test_cli_parallel_flag(tmp_path, capsys) -> None:
    """``specdec generate --parallel`` prints what sequential speculation prints; a drafter it
    cannot overlap is one error line."""
    import json

    from helpers import save_char_tokenizer
    from specdec.cli import main

    target = save_char_tokenizer(save_tiny_llama(tmp_path / "t", init_std=0.15, seed=0))
    draft = save_char_tokenizer(save_tiny_llama(tmp_path / "d", seed=1, base=target, noise=0.05))
    argv = [
        "generate",
        "def f(x):",
        "--target",
        str(target),
        "--draft",
        str(draft),
        "--json",
        "--max-new-tokens",
        "24",
    ]
    outputs = []
    for extra in ([], ["--parallel"]):
        assert main([*argv, *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["token_ids"] == outputs[1]["token_ids"] and outputs[1]["token_ids"]
    assert main([*argv, "--parallel", "--drafter", "ngram"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specdec: error: parallel drafting needs") and err.count("\n") == 1


def test_an_error_while_verifying_leaves_the_generator_usable(models, monkeypatch) -> None:
    """An exception in the target's pass propagates after the draft thread has finished its
    window, and the next request on the same generator is exact again."""
    import specdec.engine.parallel as parallel_module

    target = models["target"]
    gen = SpeculativeGenerator(target, DraftModelDrafter(models["good"], 2), parallel=True)
    original = parallel_module.chain_step
    calls = []

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("target pass failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(parallel_module, "chain_step", failing)
    with pytest.raises(RuntimeError, match="target pass failed"):
        gen.generate(PROMPTS[0], max_new_tokens=30)
    monkeypatch.setattr(parallel_module, "chain_step", original)
    expected = SpeculativeGenerator(target).generate(PROMPTS[0], max_new_tokens=30).token_ids
    assert gen.generate(PROMPTS[0], max_new_tokens=30).token_ids == expected
