"""Greedy speculative decoding equals plain greedy decoding token for token (float32)."""

from __future__ import annotations

import pytest
import torch

from specdec import DraftModelDrafter, GenerationError, SpeculativeGenerator, load_model
from specdec.drafters.base import Drafter, DraftProposal
from specdec.models import ModelLoadError

PROMPTS = [[5], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]


@pytest.fixture(scope="module")
def target(target_path):
    return load_model(target_path, dtype="float32")


@pytest.fixture(scope="module")
def plain(target):
    return SpeculativeGenerator(target)


class WrongDrafter(Drafter):
    """Adversarial: always proposes a token the target's greedy choice is not."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]], vocab: int, k: int) -> None:
        self.reference, self.vocab, self.num_draft_tokens = reference, vocab, k

    def prefill(self, prompt_ids, target_out):
        self.prompt = tuple(prompt_ids)

    def propose(self, ctx):
        ref = self.reference[self.prompt]
        done = len(ctx.token_ids) - len(self.prompt)
        k = min(self.num_draft_tokens, ctx.max_draft_tokens)
        wrong = [(ref[done + i] + 1) % self.vocab if done + i < len(ref) else 0 for i in range(k)]
        return DraftProposal(torch.tensor(wrong))

    def on_verified(self, result):
        pass


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_good_draft_matches_plain_greedy(target, plain, good_draft_path, k):
    gen = SpeculativeGenerator(target, DraftModelDrafter(load_model(good_draft_path, dtype="float32"), k))
    accepted = 0
    for prompt in PROMPTS:
        ref = plain.generate(prompt, max_new_tokens=40)
        out = gen.generate(prompt, max_new_tokens=40)
        assert out.token_ids == ref.token_ids
        accepted += out.stats.accepted_tokens
    assert accepted > 0  # the good draft is actually used


@pytest.mark.parametrize("k", [1, 4])
def test_far_draft_matches_plain_greedy(target, plain, far_draft_path, k):
    gen = SpeculativeGenerator(target, DraftModelDrafter(load_model(far_draft_path, dtype="float32"), k))
    for prompt in PROMPTS:
        assert gen.generate(prompt, max_new_tokens=30).token_ids == plain.generate(prompt, max_new_tokens=30).token_ids


@pytest.mark.parametrize("k", [1, 3, 8])
def test_draft_equal_to_target_accepts_everything(target, plain, k):
    gen = SpeculativeGenerator(target, DraftModelDrafter(target, k))
    out = gen.generate(PROMPTS[1], max_new_tokens=33)
    assert out.token_ids == plain.generate(PROMPTS[1], max_new_tokens=33).token_ids
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.per_position_acceptance == [1.0] * k
    # every step commits k + 1 tokens except a shorter last one
    assert out.stats.verify_steps == -(-33 // (k + 1))


@pytest.mark.parametrize("k", [1, 4, 8])
def test_adversarial_draft_accepts_nothing_and_still_matches(target, plain, k):
    reference = {tuple(p): plain.generate(p, max_new_tokens=25).token_ids for p in PROMPTS}
    gen = SpeculativeGenerator(target, WrongDrafter(reference, target.config.vocab_size, k))
    for prompt in PROMPTS:
        out = gen.generate(prompt, max_new_tokens=25)
        assert out.token_ids == reference[tuple(prompt)]
        assert out.stats.accepted_tokens == 0 and out.stats.draft_tokens > 0
        assert out.stats.mean_accepted_length == 1.0


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 13])
def test_max_new_tokens_mid_block(target, plain, max_new_tokens):
    gen = SpeculativeGenerator(target, DraftModelDrafter(target, 4))
    out = gen.generate(PROMPTS[1], max_new_tokens=max_new_tokens)
    assert out.token_ids == plain.generate(PROMPTS[1], max_new_tokens=max_new_tokens).token_ids
    assert len(out.token_ids) == max_new_tokens and out.finish_reason == "length"


@pytest.mark.parametrize("k", [2, 4, 8])
def test_eos_mid_block_stops_and_is_excluded(target, plain, good_draft_path, k):
    ref = plain.generate(PROMPTS[2], max_new_tokens=30).token_ids
    eos = ref[9]
    first = ref.index(eos)  # EOS may occur earlier than position 9
    gens = [plain, SpeculativeGenerator(target, DraftModelDrafter(target, k)),
            SpeculativeGenerator(target, DraftModelDrafter(load_model(good_draft_path, dtype="float32"), k))]
    for gen in gens:
        gen.eos_token_ids = frozenset({eos})
        out = gen.generate(PROMPTS[2], max_new_tokens=30)
        assert out.token_ids == ref[:first]
        assert out.finish_reason == "eos"
        gen.eos_token_ids = frozenset()


def test_stream_concatenates_to_generate(target):
    gen = SpeculativeGenerator(target, DraftModelDrafter(target, 3))
    stream = gen.stream(PROMPTS[1], max_new_tokens=20)
    chunks = list(stream)
    assert len(chunks) < 20  # several tokens per chunk
    assert [t for c in chunks for t in c.token_ids] == gen.generate(PROMPTS[1], max_new_tokens=20).token_ids
    assert stream.stats.new_tokens == 20 and stream.finish_reason == "length"


def test_sampling_is_reproducible_with_seed(target, good_draft_path):
    gen = SpeculativeGenerator(target, DraftModelDrafter(load_model(good_draft_path, dtype="float32"), 4))
    a = gen.generate(PROMPTS[1], max_new_tokens=30, temperature=1.0, seed=123)
    b = gen.generate(PROMPTS[1], max_new_tokens=30, temperature=1.0, seed=123)
    c = gen.generate(PROMPTS[1], max_new_tokens=30, temperature=1.0, seed=124)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_context_end_stops_generation(tiny_dir):
    from helpers import save_tiny_llama

    short = load_model(save_tiny_llama(tiny_dir / "short-ctx", max_position_embeddings=16), dtype="float32")
    out = SpeculativeGenerator(short, DraftModelDrafter(short, 4)).generate([1, 2, 3], max_new_tokens=100)
    plain = SpeculativeGenerator(short).generate([1, 2, 3], max_new_tokens=100)
    assert len(out.token_ids) == 13 and out.token_ids == plain.token_ids


def test_stats_fields(target):
    out = SpeculativeGenerator(target, DraftModelDrafter(target, 4)).generate(PROMPTS[1], max_new_tokens=10)
    s = out.stats.to_dict()
    for key in ("target_forwards", "draft_tokens", "accepted_tokens", "acceptance_rate", "mean_accepted_length",
                "per_position_acceptance", "prefill_s", "draft_s", "verify_s", "overhead_s", "total_s"):
        assert key in s
    assert s["target_forwards"] == s["verify_steps"] + 1  # one prefill pass
    assert s["mean_accepted_length"] == 5.0


def test_bad_inputs(target, tiny_dir):
    gen = SpeculativeGenerator(target)
    with pytest.raises(GenerationError, match="temperature"):
        gen.generate([1], temperature=-1)
    with pytest.raises(GenerationError, match="empty"):
        gen.generate([])
    with pytest.raises(GenerationError, match="context"):
        gen.generate(list(range(5)) * 60)
    with pytest.raises(GenerationError, match="tokenizer"):
        gen.generate("hello")
    with pytest.raises(ValueError, match="num_draft_tokens"):
        DraftModelDrafter(target, 0)
    from helpers import save_tiny_llama

    other = load_model(save_tiny_llama(tiny_dir / "vocab-120", vocab_size=120), dtype="float32")
    with pytest.raises(ModelLoadError, match="vocabulary mismatch"):
        SpeculativeGenerator(target, DraftModelDrafter(other, 2))


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("bf16_rows", [False, True])
def test_a_model_run_in_bfloat16_matches_its_own_plain_greedy_decoding(k, bf16_rows, set_options):
    # In bfloat16 the kernels' products round their rows to bfloat16 (AVX512-BF16 dot products,
    # unless the option bf16_rows is off): the target's function changes a little, but a K-token verify
    # pass still gives each row what a 1-token pass gives, so greedy output is plain decoding's.
    set_options(bf16_rows=bf16_rows)
    target = load_model("demo-target", dtype="bfloat16")
    draft = load_model("demo-draft", dtype="bfloat16")
    assert target.module.runs_bfloat16 and not load_model("demo-draft", dtype="float32").module.runs_bfloat16
    plain = SpeculativeGenerator(target)
    spec = SpeculativeGenerator(target, DraftModelDrafter(draft, num_draft_tokens=k))
    for prompt in ("def fibonacci(n):\n", "import os\nimport sys\n\n\nclass Config:\n"):
        reference = plain.generate(prompt, max_new_tokens=40)
        out = spec.generate(prompt, max_new_tokens=40)
        assert out.token_ids == reference.token_ids
        assert out.stats.mean_accepted_length > 1.2  # the draft does get accepted
