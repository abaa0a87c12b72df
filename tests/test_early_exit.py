"""Self-speculative early-exit drafting: greedy equality, exact sampling distribution, and the
claim that the drafter's kept KV entries equal the target's own for the first L layers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers import needs_kernels, save_tiny_llama
from specdec import SpeculativeGenerator, kernels, load_model
from specdec.drafters import DraftContext, EarlyExitDrafter, TargetOutput
from specdec.drafters.heads import ExitHead, new_head
from specdec.losslessness import exact_two_token_joint, goodness_of_fit, sample_two_tokens
from specdec.models import LoadedModel
from specdec.sampling import SamplingParams

PROMPTS = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 40, 2, 2, 17, 80, 33, 61, 5, 5, 12]]


def exit_head(target: LoadedModel, exit_layer: int, seed: int = 0, noise: float = 0.05) -> ExitHead:
    """The target's own norm at layer L plus a small random adapter."""
    torch.manual_seed(seed)
    head = new_head("early-exit", target.config, exit_layer=exit_layer)
    assert isinstance(head, ExitHead)
    head.init_from(target.module)
    with torch.no_grad():
        head.proj.weight.normal_(0.0, noise)
    return head.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = save_tiny_llama(tmp_path_factory.mktemp("ee") / "t", num_layers=3, init_std=0.15, seed=0)
    return load_model(folder, dtype="float32")


@pytest.mark.parametrize("shared", [True, False], ids=["target-cache", "own-cache"])
def test_greedy_output_equals_plain_decoding(target, shared, monkeypatch):
    # shared: layers 0..L-1 in the target's cache, reused by the verify pass (where the kernels
    # run); else the drafter's own cache (the server's way)
    if not shared:
        monkeypatch.setattr(target.module, "reuses_layers", lambda: False)
    plain = SpeculativeGenerator(target)
    cases = [(prompt, max_new) for prompt in PROMPTS for max_new in (1, 6, 40)]
    want = {(tuple(p), m): plain.generate(p, max_new_tokens=m).token_ids for p, m in cases}
    for exit_layer, k in [(1, 1), (1, 4), (2, 3), (2, 6)]:
        drafter = EarlyExitDrafter(target, exit_head(target, exit_layer), k)
        gen = SpeculativeGenerator(target, drafter)
        accepted = drafted = 0
        for prompt, max_new in cases:
            out = gen.generate(prompt, max_new_tokens=max_new)
            assert out.token_ids == want[tuple(prompt), max_new], (exit_layer, k, prompt, max_new)
            assert drafter._shared == (shared and kernels.load() is not None)
            accepted, drafted = accepted + out.stats.accepted_tokens, drafted + out.stats.draft_tokens
        assert 0 < accepted < drafted, (exit_layer, k)  # both paths of verification were taken


def test_greedy_stops_at_eos_inside_a_block(target):
    prompt = PROMPTS[2]
    ref = SpeculativeGenerator(target).generate(prompt, max_new_tokens=30).token_ids
    eos = ref[7]
    with_eos = replace(target, config=replace(target.config, eos_token_ids=(eos,)))
    gen = SpeculativeGenerator(with_eos, EarlyExitDrafter(with_eos, exit_head(target, 2), 5))
    out = gen.generate(prompt, max_new_tokens=30)
    assert out.token_ids == ref[: ref.index(eos)] and out.finish_reason == "eos"


@torch.inference_mode()
def test_kept_cache_entries_equal_the_targets_first_layers(target):
    """After generation the drafter's cache holds, for every slot it kept, the keys/values the
    target computes in layers 0..L-1 for the committed sequence (the reuse the docstring
    claims)."""
    drafter = EarlyExitDrafter(target, exit_head(target, 2), 4)
    prompt = PROMPTS[1]
    out = SpeculativeGenerator(target, drafter).generate(prompt, max_new_tokens=20)
    tokens = torch.tensor([prompt + out.token_ids])  # (1, T)
    cache = target.new_cache(1, tokens.shape[1])
    target(tokens, torch.arange(tokens.shape[1]), cache)
    kept = drafter.cache.lengths[0]
    assert kept >= len(prompt) + 10
    torch.testing.assert_close(
        drafter.cache.k[:2, 0, :, :kept], cache.k[:2, 0, :, :kept], atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        drafter.cache.v[:2, 0, :, :kept], cache.v[:2, 0, :, :kept], atol=1e-5, rtol=1e-4
    )


def test_exit_layer_must_leave_layers_to_skip(target):
    with pytest.raises(ValueError, match="exit_layer"):
        new_head("early-exit", target.config, exit_layer=3)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        EarlyExitDrafter(target, exit_head(target, 1), 0)


@pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "loop"])
@pytest.mark.parametrize("sampling", [dict(temperature=1.2, top_p=0.85)])
def test_sampling_matches_exact_target_distribution(tmp_path, sampling, one_call, monkeypatch):
    """Both ways of sampling the chain: one C++ call (exit_sample) and the Python loop
    (pick_tokens, which the other head drafters' loops use too)."""
    if one_call:
        needs_kernels()
    else:
        monkeypatch.setattr(EarlyExitDrafter, "_one_call", lambda self: False)
    folder = save_tiny_llama(
        tmp_path / "t", vocab_size=10, hidden_size=32, num_layers=3, init_std=0.6, seed=3
    )
    small = load_model(folder, dtype="float32")
    prompt = [3, 1, 4]
    first, joint = exact_two_token_joint(small, prompt, SamplingParams(**sampling))
    assert abs(joint.sum() - 1) < 1e-5
    gen = SpeculativeGenerator(small, EarlyExitDrafter(small, exit_head(small, 1, noise=0.3), 3))
    fit = goodness_of_fit(sample_two_tokens(gen, prompt, 1200, **sampling), first, joint)
    assert fit.pvalue > 1e-3, f"chi-square p = {fit.pvalue:.2e}"
    assert fit.total_variation < 3 * fit.null_total_variation, fit
    rate = gen.generate(prompt, max_new_tokens=30, seed=0, **sampling).stats.acceptance_rate
    assert 0.0 < rate < 1.0  # the drafts are neither always right nor always wrong


@torch.inference_mode()
def test_verify_pass_reusing_the_drafters_layers_gives_the_full_pass_bit_for_bit(target):
    # Where the kernels run, the drafter writes layers 0..L-1 of the pending token and its drafts
    # into the target's cache, and the verify pass runs those layers for the last draft only
    # (ReusedLayers). Logits, hidden states and cache must be the full pass's, bit for bit (greedy
    # equality rests on it), and the drafts those of a drafter with a cache of its own.
    needs_kernels()
    module, prompt, K = target.module, PROMPTS[2], 4
    n = len(prompt)
    assert module.reuses_layers()
    caches = [target.new_cache(1, 64) for _ in range(2)]
    for cache in caches:
        target(torch.tensor([prompt[:-1]]), torch.arange(n - 1), cache, num_logits=0)
        cache.truncate(n - 1)
    ctx = DraftContext(prompt, SamplingParams(), K)
    drafter = EarlyExitDrafter(target, exit_head(target, 2), K)
    drafter.prefill(prompt, TargetOutput(None, caches[0]))
    proposal = drafter.propose(ctx)
    assert proposal.reused is not None and proposal.reused.num_layers == 2
    assert proposal.reused.hidden.shape == (K, target.config.hidden_size)
    tokens = torch.tensor([[prompt[-1], *proposal.tokens.tolist()]])  # (1, K+1)
    pos = torch.arange(n - 1, n + K)[None]
    reused = module.forward_reusing(tokens, pos, caches[0], 2, proposal.reused.hidden[None], n + K)
    full = module(tokens, pos, caches[1], return_hidden=True, kv_len=n + K)
    assert torch.equal(reused[0], full[0]) and torch.equal(reused[1], full[1])
    assert torch.equal(caches[0].k[:, :, :, : n + K], caches[1].k[:, :, :, : n + K])
    assert torch.equal(caches[0].v[:, :, :, : n + K], caches[1].v[:, :, :, : n + K])
    own = EarlyExitDrafter(target, exit_head(target, 2), K)
    own.prefill(prompt, TargetOutput(None))  # no target cache given (the server): its own
    mine = own.propose(ctx)
    assert mine.reused is None and torch.equal(mine.tokens, proposal.tokens)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("subset", [False, True], ids=["full-vocab", "draft-vocab"])
@pytest.mark.parametrize("shared", [True, False], ids=["target-cache", "own-cache"])
def test_chain_in_one_call_proposes_what_the_python_loop_proposes(target, shared, subset, sampled, monkeypatch):
    # Chains run in one C++ call (kernels.exit_greedy, kernels.exit_sample) on a float32 target:
    # step by step through whole (seeded) generations they must propose the Python loop's drafts
    # (sampled: with its distributions) and hand the verify pass the same layer-L states, with
    # the target's cache or one of the drafter's own (the server's way: no cache in
    # TargetOutput), over the full or a reduced vocabulary.
    from specdec.drafters.vocab import DraftVocab
    from specdec.engine import generator

    needs_kernels()
    if not shared:
        monkeypatch.setattr(generator, "TargetOutput", lambda hidden, cache=None: TargetOutput(hidden))
    vocab = DraftVocab(target, list(range(0, 96, 3))) if subset else 0

    def proposals() -> list[tuple[list[int], torch.Tensor | None]]:
        drafter = EarlyExitDrafter(target, exit_head(target, 2), 4, draft_vocab=vocab)
        seen = []
        propose = drafter.propose

        def record(ctx):  # type: ignore[no-untyped-def]
            proposal = propose(ctx)
            seen.append((proposal.tokens.tolist(), proposal.reused.hidden if proposal.reused else None))
            probs.append(proposal.draft_probs)
            return proposal

        drafter.propose = record  # type: ignore[method-assign]
        for seed, prompt in enumerate([*PROMPTS[1:], [(7 * i) % 90 + 1 for i in range(40)]]):
            SpeculativeGenerator(target, drafter).generate(prompt, max_new_tokens=24, seed=seed, **sampling)
        return seen

    sampling = dict(temperature=0.8, top_k=50, top_p=0.95) if sampled else {}
    calls, probs = [], []
    name = "exit_sample" if sampled else "exit_greedy"
    one_call = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *args: calls.append(1) or one_call(*args))
    got = proposals()
    assert len(calls) == len(got) >= 3 * 5
    with monkeypatch.context() as patch:
        patch.setattr(EarlyExitDrafter, "_one_call", lambda self: False)  # the Python loop runs
        want = proposals()
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    for (_, mine), (_, theirs) in zip(got, want, strict=True):
        assert (mine is None) == (theirs is None) == (not shared)
        assert mine is None or torch.equal(mine, theirs)
    got_probs, want_probs = probs[: len(got)], probs[len(got) :]
    for q_got, q_want in zip(got_probs, want_probs, strict=True):
        assert (q_got is None) == (q_want is None) == (not sampled)
        if sampled:
            torch.testing.assert_close(q_got, q_want, atol=1e-5, rtol=1e-4)
    if subset:
        assert all(t % 3 == 0 for tokens, _ in got for t in tokens)
