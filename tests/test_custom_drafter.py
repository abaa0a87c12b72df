"""A drafter written by a user against the typed contract, in one small class: the worked
example of docs/architecture.md ("Writing a drafter")."""

from __future__ import annotations

import torch

import specdec
from specdec.drafters import DraftContext, Drafter, DraftProposal, TargetOutput
from specdec.verify.chain import VerifyResult


class BigramDrafter(Drafter):
    """Propose what followed the latest earlier occurrence of the previous token, K times over.

    Deterministic drafts (``draft_probs`` None) and the default capabilities: it reads nothing
    of the target's and keeps no state, so ``prefill`` and ``on_verified`` have nothing to do.
    """

    def __init__(self, num_draft_tokens: int = 4) -> None:
        self.num_draft_tokens = num_draft_tokens

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        pass

    def propose(self, ctx: DraftContext) -> DraftProposal:
        ids = list(ctx.token_ids)
        drafts: list[int] = []
        while len(drafts) < min(self.num_draft_tokens, ctx.max_draft_tokens):
            previous = ids[-1]
            follows = [ids[i + 1] for i in range(len(ids) - 1) if ids[i] == previous]
            if not follows:
                break
            drafts.append(follows[-1])
            ids.append(follows[-1])
        return DraftProposal(torch.tensor(drafts, dtype=torch.long))  # (k,)

    def on_verified(self, result: VerifyResult) -> None:
        pass


PROMPTS = ["def fib(n):\n    if n < 2:\n        return n\n", "for i in range(10):\n    print(i)\n"]


def test_custom_drafter_greedy_output_equals_plain_decoding() -> None:
    target = specdec.load_model("demo-target", dtype="float32")
    plain = specdec.SpeculativeGenerator(target)
    drafter = BigramDrafter(num_draft_tokens=4)
    assert isinstance(drafter, specdec.Drafter)  # the runtime-checkable protocol
    assert drafter.capabilities == specdec.DrafterCapabilities()  # inherited defaults
    spec = specdec.SpeculativeGenerator(target, drafter)
    forwards = {"plain": 0, "spec": 0}
    for prompt in PROMPTS:
        want = plain.generate(prompt, max_new_tokens=48, ignore_eos=True)
        got = spec.generate(prompt, max_new_tokens=48, ignore_eos=True)
        assert got.token_ids == want.token_ids
        assert got.stats.draft_tokens > 0
        forwards["plain"] += want.stats.target_forwards
        forwards["spec"] += got.stats.target_forwards
    assert forwards["spec"] < forwards["plain"]  # the bigrams of code repeat: some drafts are right


def test_custom_drafter_runs_in_the_batched_server_engine() -> None:
    from specdec.sampling import SamplingParams
    from specdec.serving.batch_engine import BatchEngine, EngineEvent, EngineRequest
    from specdec.serving.metrics import ServerMetrics

    target = specdec.load_model("demo-target", dtype="float32")
    plain = specdec.SpeculativeGenerator(target)
    engine = BatchEngine(target, BigramDrafter, 2, ServerMetrics("t"), adaptive_draft_tokens=False)
    outputs: dict[int, list[int]] = {0: [], 1: []}

    def collect(i: int):  # type: ignore[no-untyped-def]
        def emit(event: EngineEvent) -> None:
            outputs[i].extend(event.token_ids)

        return emit

    for i, prompt in enumerate(PROMPTS):
        ids = target.tokenizer.encode(prompt)  # type: ignore[union-attr]
        engine.add(EngineRequest(ids, 32, SamplingParams(), collect(i), ignore_eos=True))
    while engine.num_active:
        engine.step()
    for i, prompt in enumerate(PROMPTS):
        assert outputs[i] == plain.generate(prompt, max_new_tokens=32, ignore_eos=True).token_ids
