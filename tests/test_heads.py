"""Medusa and EAGLE drafters: greedy equality with plain decoding, exact sampling distribution,
head training, and head files."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from helpers import needs_kernels, random_head, save_tiny_llama
from specdec import SpeculativeGenerator, load_model
from specdec.drafters import DraftContext, EagleDrafter, MedusaDrafter, TargetOutput
from specdec.drafters.base import Drafter, empty_proposal
from specdec.drafters.heads import load_head, new_head, save_head
from specdec.drafters.medusa import best_first_tree
from specdec.losslessness import exact_two_token_joint, goodness_of_fit, sample_two_tokens
from specdec.models import LoadedModel, ModelLoadError
from specdec.sampling import SamplingParams, logits_to_probs
from specdec.train.heads import HeadTrainConfig, train_head

PROMPTS = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 40, 2, 2, 17, 80, 33, 61, 5, 5, 12]]


@pytest.fixture(scope="module")
def target(target_path):
    return load_model(target_path, dtype="float32")


@pytest.fixture(scope="module")
def sequences(target):
    """Text the target itself writes: 48 sequences of 32 tokens."""
    gen = SpeculativeGenerator(target)
    rows = []
    for i in range(48):
        start = [1 + (7 * i) % 90]
        rows.append(start + gen.generate(start, max_new_tokens=31, temperature=1.0, seed=i).token_ids)
    return torch.tensor(rows)  # (48, 32)


@pytest.fixture(scope="module")
def trained(target, sequences):
    """Heads trained for a few steps (they draft better than random, far from perfectly)."""
    results = {}
    for method in ("medusa", "eagle", "early-exit"):
        cfg = HeadTrainConfig(
            method, steps=30, batch_size=4, lr=1e-2, num_heads=4, exit_layer=1, target_dtype="float32"
        )
        results[method] = train_head(target, sequences[:40], sequences[40:], cfg, progress=False)
    return results


def drafters(target: LoadedModel, trained) -> dict[str, object]:  # type: ignore[no-untyped-def]
    medusa, eagle = trained["medusa"].head, trained["eagle"].head
    return {
        "medusa-k2": MedusaDrafter(target, medusa, num_draft_tokens=2),
        "medusa-k4": MedusaDrafter(target, medusa, num_draft_tokens=4),
        "medusa-tree": MedusaDrafter(target, medusa, num_draft_tokens=3, tree_width=3, max_tree_nodes=10),
        "eagle-k1": EagleDrafter(target, eagle, num_draft_tokens=1),
        "eagle-k3": EagleDrafter(target, eagle, num_draft_tokens=3),
        "eagle-k5": EagleDrafter(target, eagle, num_draft_tokens=5),
        "eagle-tree": EagleDrafter(target, eagle, num_draft_tokens=4, tree_width=2, max_tree_nodes=7),
    }


def test_greedy_output_equals_plain_decoding(target, trained):
    plain = SpeculativeGenerator(target)
    cases = [(prompt, max_new) for prompt in PROMPTS for max_new in (1, 7, 40)]  # ends mid-block too
    want = {(tuple(p), m): plain.generate(p, max_new_tokens=m).token_ids for p, m in cases}
    for name, drafter in drafters(target, trained).items():
        gen = SpeculativeGenerator(target, drafter)  # type: ignore[arg-type]
        accepted = drafted = 0
        for prompt, max_new in cases:
            out = gen.generate(prompt, max_new_tokens=max_new)
            assert out.token_ids == want[tuple(prompt), max_new], (name, prompt, max_new)
            assert out.stats.target_forwards <= max_new + 1
            accepted, drafted = accepted + out.stats.accepted_tokens, drafted + out.stats.draft_tokens
        # The equality means something only if drafts are both kept and refused.
        assert 0 < accepted < drafted, name


def test_greedy_stops_at_eos_inside_a_block(target, trained):
    prompt = PROMPTS[1]
    ref = SpeculativeGenerator(target).generate(prompt, max_new_tokens=30).token_ids
    eos = ref[9]
    with_eos = replace(target, config=replace(target.config, eos_token_ids=(eos,)))
    want = ref[: ref.index(eos)]
    for name, drafter in drafters(with_eos, trained).items():
        out = SpeculativeGenerator(with_eos, drafter).generate(prompt, max_new_tokens=30)  # type: ignore[arg-type]
        assert out.token_ids == want and out.finish_reason == "eos", name


@torch.inference_mode()
def reference_eagle_logits(target, head, token_ids: list[int], path: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """EAGLE's draft logits after ``token_ids + path``, one entry at a time (no tree)."""
    n = len(token_ids)
    _, hidden = target(
        torch.tensor([token_ids[:-1]]), torch.arange(n - 1), target.new_cache(1, n), return_hidden=True
    )
    cache = head.new_cache(1, n + len(path))
    embed = target.module.model.embed_tokens
    feature = head(embed(torch.tensor([token_ids[1:]])), hidden, torch.arange(n - 1)[None], cache)[0, -1]
    for i, token in enumerate(path):
        pos = torch.tensor([[n - 1 + i]])
        feature = head(embed(torch.tensor([[token]])), feature[None, None], pos, cache)[0, -1]
    return target.module.lm_head(feature)  # (V,)


def test_eagle_tree_children_are_the_top_k_of_their_path(target, trained):
    """Tree attention in the head's cache reproduces sequential drafting along every path."""
    head = trained["eagle"].head
    drafter = EagleDrafter(target, head, num_draft_tokens=3, tree_width=2, max_tree_nodes=100)
    for prompt in PROMPTS[1:]:
        n = len(prompt)
        _, hidden = target(
            torch.tensor([prompt[:-1]]), torch.arange(n - 1), target.new_cache(1, n), return_hidden=True
        )
        drafter.prefill(prompt, TargetOutput(hidden[0]))
        tree = drafter.propose(DraftContext(list(prompt), SamplingParams(), 3)).tree
        assert tree is not None
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        paths = {-1: []}
        for i, parent in enumerate(parents):
            paths[i] = paths[parent] + [tokens[i]]
        assert max(len(p) for p in paths.values()) == 3
        for node in [-1, *sorted(set(parents) - {-1})]:
            kids = {tokens[i] for i, parent in enumerate(parents) if parent == node}
            want = set(reference_eagle_logits(target, head, prompt, paths[node]).topk(2).indices.tolist())
            assert kids == want, (prompt, paths[node])


def test_eagle_tree_sampling_records_the_distributions_it_drew_from(target, trained):
    """Each node's draft_probs row is the processed head distribution after its parent's path."""
    head = trained["eagle"].head
    drafter = EagleDrafter(target, head, num_draft_tokens=3, tree_width=2, max_tree_nodes=12)
    params = SamplingParams(temperature=0.9, top_k=20)
    prompt = PROMPTS[2]
    n = len(prompt)
    _, hidden = target(
        torch.tensor([prompt[:-1]]), torch.arange(n - 1), target.new_cache(1, n), return_hidden=True
    )
    drafter.prefill(prompt, TargetOutput(hidden[0]))
    generator = torch.Generator().manual_seed(0)
    tree = drafter.propose(DraftContext(list(prompt), params, 3, generator)).tree
    assert tree is not None and tree.draft_probs is not None and 3 < tree.num_nodes <= 12
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    paths: dict[int, list[int]] = {-1: []}
    for i, parent in enumerate(parents):
        paths[i] = paths[parent] + [tokens[i]]
        want = logits_to_probs(reference_eagle_logits(target, head, prompt, paths[parent]), params)
        torch.testing.assert_close(tree.draft_probs[i], want, atol=1e-5, rtol=1e-4)
        assert want[tokens[i]] > 0


class SkipEveryThird(Drafter):
    """Wraps a drafter and proposes nothing every third step (as an adaptive K = 0 would): the
    engine then calls no on_verified, and the inner drafter misses those hidden states."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.steps = inner, 0
        self.num_draft_tokens, self.capabilities = inner.num_draft_tokens, inner.capabilities

    def prefill(self, prompt_ids, target_out):  # type: ignore[no-untyped-def]
        self.inner.prefill(prompt_ids, target_out)

    def propose(self, ctx):  # type: ignore[no-untyped-def]
        self.steps += 1
        return empty_proposal() if self.steps % 3 == 0 else self.inner.propose(ctx)

    def on_verified(self, result):  # type: ignore[no-untyped-def]
        self.inner.on_verified(result)


def test_steps_without_hidden_states_keep_output_and_drafting(target, trained):
    plain = SpeculativeGenerator(target)
    for name in ("medusa-k4", "eagle-k3", "eagle-tree"):
        wrapped = SkipEveryThird(drafters(target, trained)[name])
        gen = SpeculativeGenerator(target, wrapped)  # type: ignore[arg-type]
        accepted = 0
        for prompt in PROMPTS:
            out = gen.generate(prompt, max_new_tokens=30)
            assert out.token_ids == plain.generate(prompt, max_new_tokens=30).token_ids, name
            accepted += out.stats.accepted_tokens
        assert accepted > 0, name  # still drafting usefully after the gaps


def test_best_first_tree_keeps_the_best_nodes_as_a_tree():
    scores = [[0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.6, 0.3, 0.1]]
    ranks, parents = best_first_tree(scores, 6)
    assert ranks == [(0,), (0, 0), (0, 1), (0, 0, 0), (0, 1, 0), (0, 0, 1)]
    assert parents == [-1, 0, 0, 1, 2, 1]
    chain, chain_parents = best_first_tree([[1.0], [1.0], [1.0]], 10)
    assert chain == [(0,), (0, 0), (0, 0, 0)] and chain_parents == [-1, 0, 1]


# ------------------------------------------------------------------ lossless sampling
PROMPT = [3, 1, 4]
N = 1200


@pytest.fixture(scope="module")
def small_target(tmp_path_factory):
    folder = save_tiny_llama(
        tmp_path_factory.mktemp("vocab8") / "t", vocab_size=8, hidden_size=32, init_std=0.6, seed=3
    )
    return load_model(folder, dtype="float32")


SAMPLING = [  # the Python loop's chain sampling (pick_tokens) is covered by test_early_exit.py
    ("medusa", dict(num_draft_tokens=2, tree_width=3), dict(temperature=0.8, top_k=5)),
    ("eagle", dict(num_draft_tokens=3, tree_width=2), dict(temperature=1.0)),
    (
        "eagle",
        dict(num_draft_tokens=3),
        dict(temperature=0.9, top_p=0.9),
    ),  # the one-call chain (eagle_sample)
    ("eagle3", dict(num_draft_tokens=3, tree_width=2), dict(temperature=1.0)),  # fused layer features
    ("eagle3", dict(num_draft_tokens=3), dict(temperature=0.9, top_p=0.9)),
]
HEAD_SETTINGS = {"medusa": {"num_heads": 2}, "eagle3": {"feature_layers": (0,)}}


@pytest.mark.parametrize("method,options,sampling", SAMPLING, ids=[f"{m}-{o}-{s}" for m, o, s in SAMPLING])
def test_sampling_matches_exact_target_distribution(small_target, method, options, sampling):
    first, joint = exact_two_token_joint(small_target, PROMPT, SamplingParams(**sampling))
    assert abs(joint.sum() - 1) < 1e-5  # the whole joint is enumerated
    head = random_head(method.rstrip("3"), small_target, 5, **HEAD_SETTINGS.get(method, {}))
    cls = MedusaDrafter if method == "medusa" else EagleDrafter
    gen = SpeculativeGenerator(small_target, cls(small_target, head, **options))  # type: ignore[arg-type]
    fit = goodness_of_fit(sample_two_tokens(gen, PROMPT, N, **sampling), first, joint)
    assert fit.pvalue > 1e-3, f"chi-square p = {fit.pvalue:.2e}"
    assert fit.total_variation < 3 * fit.null_total_variation, fit


# ------------------------------------------------------------------ training and files
@pytest.mark.parametrize("method", ["medusa", "eagle", "early-exit"])
def test_training_lowers_the_validation_loss(trained, method):
    result = trained[method]
    assert result.val_loss_after < 0.9 * result.val_loss_before
    assert len(result.train_losses) == 30
    assert not any(p.requires_grad for p in result.head.parameters())


@pytest.mark.parametrize("method", ["medusa", "eagle", "early-exit"])
def test_head_files_round_trip_and_default_location(target, target_path, tmp_path, method):
    settings = {"num_heads": 3} if method == "medusa" else {"exit_layer": 1} if method == "early-exit" else {}
    head = random_head(method, target, 3, **settings)
    folder = tmp_path / "target"
    shutil.copytree(target_path, folder)
    save_head(head, folder / method, target.config)
    loaded = load_head(folder / method, target.config, method, torch.float32, "cpu")
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    from specdec.drafters.registry import DrafterSpec, make_drafter

    copy = load_model(folder, dtype="float32")
    by_name = make_drafter(method, DrafterSpec(copy, num_draft_tokens=3))  # loads <target>/<method>
    by_object = make_drafter(method, DrafterSpec(copy, num_draft_tokens=3, heads=str(folder / method)))
    outs = [
        SpeculativeGenerator(copy, d).generate(PROMPTS[1], max_new_tokens=12) for d in (by_name, by_object)
    ]
    assert outs[0].token_ids == outs[1].token_ids
    assert outs[0].stats.accepted_tokens == outs[1].stats.accepted_tokens


def test_missing_or_mismatched_heads_are_user_errors(target, tmp_path):
    with pytest.raises(ModelLoadError, match="train heads"):
        MedusaDrafter(target)  # no <target>/medusa folder
    other = save_tiny_llama(tmp_path / "other", hidden_size=32)
    other_model = load_model(other, dtype="float32")
    save_head(new_head("eagle", other_model.config), tmp_path / "eagle32", other_model.config)
    with pytest.raises(ModelLoadError, match="hidden size"):
        EagleDrafter(target, tmp_path / "eagle32")
    save_head(new_head("eagle", target.config), tmp_path / "eagle64", target.config)
    with pytest.raises(ModelLoadError, match="not 'medusa'"):
        MedusaDrafter(target, tmp_path / "eagle64")
    with pytest.raises(ValueError, match="one per head"):
        MedusaDrafter(target, new_head("medusa", target.config, num_heads=2), num_draft_tokens=3)


def test_cli_trains_heads_beside_the_target_and_generates_with_them(tmp_path, capsys):
    import json

    from helpers import save_char_tokenizer
    from specdec.cli import main

    folder = save_char_tokenizer(save_tiny_llama(tmp_path / "t", init_std=0.15, eos_token_id=0))
    small = [
        "--steps",
        "4",
        "--num-sequences",
        "6",
        "--val-sequences",
        "2",
        "--seq-len",
        "32",
        "--target-dtype",
        "float32",
    ]
    assert (
        main(["train", "heads", "--method", "medusa", "--target", str(folder), "--num-heads", "2", *small])
        == 0
    )
    report = json.loads((folder / "medusa" / "training.json").read_text())
    assert report["config"]["num_heads"] == 2 and len(report["val_top1_after"]) == 2
    capsys.readouterr()
    outs = []
    for drafter in ("none", "medusa"):
        argv = [
            "generate",
            "--target",
            str(folder),
            "--drafter",
            drafter,
            "-k",
            "2",
            "--json",
            "--max-new-tokens",
            "12",
        ]
        assert main([*argv, "def f(x):"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["token_ids"] == outs[1]["token_ids"] and outs[1]["stats"]["draft_tokens"] > 0
    assert (
        main(["generate", "--target", str(folder), "--drafter", "eagle", "def f(x):"]) == 2
    )  # no eagle heads
    assert "train heads" in capsys.readouterr().err
    assert main(["train", "heads", "--method", "eagle", "--target", str(folder), "--steps", "0"]) == 2


def test_shipped_demo_heads_load_and_decode_losslessly():
    """The heads shipped beside demo-target load by name and keep greedy output unchanged."""
    from specdec.drafters.registry import DrafterSpec, make_drafter

    demo = load_model("demo-target", dtype="float32")
    prompt = demo.tokenizer.encode("def read_lines(path):\n    with open(path) as f:\n")
    want = SpeculativeGenerator(demo).generate(prompt, max_new_tokens=16).token_ids
    for method in ("early-exit", "medusa", "eagle"):
        drafter = make_drafter(method, DrafterSpec(demo, num_draft_tokens=4))
        out = SpeculativeGenerator(demo, drafter).generate(prompt, max_new_tokens=16)
        assert out.token_ids == want, method
        assert out.stats.accepted_tokens > 0, method  # trained heads: some drafts are right


def test_eagle_head_layer_runs_in_one_call_like_the_module_path(target):
    # In inference on a CPU with the kernels, the head's decoder layer is one C++ call over copies of
    # its weights: it must agree with the module path (chain and tree masks), and follow the
    # parameters when they change (a head being trained).
    from specdec import kernels

    needs_kernels()
    head = random_head("eagle", target, seed=4)
    d = target.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    embeds, feats = torch.randn(1, 6, d, generator=gen), torch.randn(1, 6, d, generator=gen)
    tree = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None]  # (1, T, S)
    tree[0, 4, 3] = False  # node 4 does not see node 3 (siblings)

    def run(**kw):  # type: ignore[no-untyped-def]
        cache = head.new_cache(1, 16)
        with torch.inference_mode():
            return head(embeds, feats, torch.arange(6)[None], cache, **kw)

    fast = [run(), run(attn_mask=tree)]
    apply = kernels.fused_layers_apply
    kernels.fused_layers_apply = lambda x: False
    try:
        slow = [run(), run(attn_mask=tree)]
    finally:
        kernels.fused_layers_apply = apply
    assert head._kernel_weights is not None
    for f, s in zip(fast, slow, strict=True):
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast[0], fast[1])  # the mask mattered
    with torch.no_grad():
        head.layer.mlp.down_proj.weight.mul_(2.0)  # in place, as an optimizer step is
    changed = run()
    kernels.fused_layers_apply = lambda x: False
    try:
        expected = run()
    finally:
        kernels.fused_layers_apply = apply
    torch.testing.assert_close(changed, expected, rtol=1e-5, atol=1e-5)


def test_eagle_head_saved_in_bfloat16_reads_exact_copies_with_the_same_bits(target):
    # A head saved in bfloat16 and loaded in float32 (the shipped one) drafts through bfloat16
    # copies of its products (fc and the layer): half the bytes, bit-identical features.
    from specdec import kernels

    needs_kernels()
    head = random_head("eagle", target, seed=5)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(p.bfloat16().float())
    d = target.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    embeds, feats = torch.randn(1, 5, d, generator=gen), torch.randn(1, 5, d, generator=gen)

    def run():  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            return head(embeds, feats, torch.arange(5)[None], head.new_cache(1, 16))

    compact = run()
    with torch.inference_mode():
        fc, weights = head._kernel_copies(embeds)  # type: ignore[misc]
    assert fc.dtype == torch.bfloat16 and weights[5].dtype == torch.bfloat16
    exact = kernels.exact_bfloat16
    kernels.exact_bfloat16 = lambda weight: None  # keep the float32 weights
    try:
        head._kernel_weights = None
        full = run()
        with torch.inference_mode():
            assert head._kernel_copies(embeds)[0].dtype == torch.float32  # type: ignore[index]
    finally:
        kernels.exact_bfloat16 = exact
    assert torch.equal(compact, full)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("subset", [False, True])
def test_eagle_greedy_chain_in_one_call_proposes_what_the_python_loop_proposes(target_path, dtype, subset):
    # Greedy chains of EAGLE run in one C++ call (EagleHead.draft_chain): the head entries built on
    # target features, then each draft and its feature. Step by step through whole generations, it
    # must propose exactly the Python loop's drafts, with the full vocabulary and a reduced one,
    # for a float32 and a bfloat16 target, from a first feed of one entry and of more than
    # kernels.MAX_ROWS entries (a long prompt).
    from specdec import kernels
    from specdec.drafters.heads import EagleHead
    from specdec.drafters.vocab import DraftVocab

    needs_kernels()
    target = load_model(target_path, dtype=dtype)
    vocab = DraftVocab(target, list(range(0, 96, 3))) if subset else 0
    prompts = [[5, 7], [9, 40, 2, 2, 17, 80, 33, 61, 5, 5, 12], [(7 * i) % 90 + 1 for i in range(40)]]

    def proposals() -> list[list[int]]:
        drafter = EagleDrafter(
            target, random_head("eagle", target, seed=6), num_draft_tokens=4, draft_vocab=vocab
        )
        seen: list[list[int]] = []
        propose = drafter.propose

        def record(ctx):  # type: ignore[no-untyped-def]
            proposal = propose(ctx)
            seen.append(proposal.tokens.tolist())
            return proposal

        drafter.propose = record  # type: ignore[method-assign]
        for prompt in prompts:
            SpeculativeGenerator(target, drafter).generate(prompt, max_new_tokens=24)
        return seen

    calls = []
    one_call = kernels.eagle_greedy
    kernels.eagle_greedy = lambda *args: calls.append(1) or one_call(*args)  # type: ignore[assignment]
    try:
        got = proposals()
    finally:
        kernels.eagle_greedy = one_call  # type: ignore[assignment]
    assert len(calls) == len(got)  # every proposal came from the one call
    draft_chain = EagleHead.draft_chain
    EagleHead.draft_chain = lambda *args, **kwargs: None  # type: ignore[method-assign]  # the Python loop runs
    try:
        want = proposals()
    finally:
        EagleHead.draft_chain = draft_chain  # type: ignore[method-assign]
    assert len(got) >= 3 * 5 and got == want
    if subset:
        assert all(t % 3 == 0 for tokens in got for t in tokens)
