"""Adaptive draft length: the cost-model decision and greedy equality through the wrapper."""

from __future__ import annotations

import pytest
import torch

from specdec import DraftModelDrafter, SpeculativeGenerator, load_model
from specdec.drafters.adaptive import AdaptiveDrafter, CostModel
from specdec.drafters.base import Drafter
from specdec.drafters.registry import DrafterSpec, make_drafter


def cost_model(alpha: float, t_draft: float, t_step: dict[int, float], k_max: int = 8) -> CostModel:
    model = CostModel(k_max)
    model.acceptance = [alpha] * k_max
    model.t_draft = t_draft
    model.t_step = dict(t_step)
    return model


def test_expected_tokens_matches_closed_form() -> None:
    model = cost_model(0.5, 1.0, {0: 1.0})
    # 1 + a + a^2 + a^3 with a = 0.5
    assert model.expected_tokens(3) == pytest.approx(1.875)
    assert model.expected_tokens(0) == 1.0


def test_high_acceptance_and_cheap_drafts_choose_the_largest_k() -> None:
    # verify cost nearly flat in K (memory-bound target), drafts 5% of a target step
    steps = {k: 1.0 + 0.01 * k for k in range(9)}
    assert cost_model(0.95, 0.05, steps).best_k() == 8


def test_useless_drafts_choose_no_speculation() -> None:
    steps = {k: 1.0 + 0.01 * k for k in range(9)}
    assert cost_model(0.02, 0.05, steps).best_k() == 0


def test_expensive_drafts_choose_a_middle_k() -> None:
    steps = {k: 1.0 + 0.05 * k for k in range(9)}
    best = cost_model(0.7, 0.3, steps).best_k()
    assert best is not None and 0 < best < 8
    model = cost_model(0.7, 0.3, steps)
    rates = [model.tokens_per_second(k) for k in range(9)]
    assert rates[best] == max(rates)


def test_acceptance_scores_tried_positions_and_relaxes_only_after_full_chains() -> None:
    model = CostModel(4, acceptance_ema=1.0, relax=0.5)  # 1: the latest outcome replaces the estimate
    prior = model.prior_acceptance
    model.record_acceptance(num_drafted=4, num_accepted=1)
    assert model.acceptance == [1.0, 0.0, prior, prior]  # accepted, first rejection, untried
    model.record_acceptance(num_drafted=2, num_accepted=2)
    assert model.acceptance[:2] == [1.0, 1.0]
    assert model.acceptance[2] == pytest.approx((prior + 1) / 2)  # halfway toward alpha_2
    assert model.acceptance[3] == prior  # only the next position relaxes


def test_a_short_k_with_full_acceptance_grows_again() -> None:
    # an early bad streak left deep positions pessimistic; then K = 1 is always accepted
    steps = {k: 1.0 + 0.01 * k for k in range(9)}
    model = cost_model(0.05, 0.05, steps)
    model.acceptance[0] = 0.9
    assert model.best_k() == 1
    for _ in range(400):  # every chain the model chooses is accepted in full
        k = model.best_k()
        assert k is not None
        model.record_acceptance(num_drafted=k, num_accepted=k)
    assert model.best_k() == 8


def first_steps(model: CostModel, *ks: int) -> None:
    """Each K's first step, which the model does not count (slow on purpose: counted, it would show)."""
    for k in ks:
        model.record_step(k, 100.0)


def test_unmeasured_k_is_priced_optimistically_from_the_measured_ones() -> None:
    model = CostModel(8)
    first_steps(model, 4)
    assert model.best_k() is None  # no timings yet
    model.record_step(4, 2.0)
    assert model.step_time(7) == 2.0  # above: the largest measured K's time
    assert model.step_time(1) == pytest.approx(2.0 * (1 + 2 / 5) / 2)  # below: halfway to 2/5 of it
    assert model.step_time(0) == 2.0  # no draft: the lowest measured K's time
    first_steps(model, 6)
    model.record_step(6, 2.4)
    assert model.step_time(5) == pytest.approx(2.2)  # between: the line through K = 4 and 6
    assert model.step_time(3) == pytest.approx(1.8)  # below: the line through them is dearer here
    assert model.step_time(1) == pytest.approx(2.0 * (1 + 2 / 5) / 2)  # ... and cheaper here


def test_a_shorter_chain_gets_tried_when_acceptance_is_low() -> None:
    """The demo pair's ``edit`` task: acceptance about 0.7 at every position, where K = 2 is
    fastest. Measured at K = 4 only, borrowing K = 4's time for K = 2 kept the policy at K = 4."""
    true_step = {k: 0.8 + 0.22 * k for k in range(9)}  # verify passes bound by arithmetic
    model = cost_model(0.7, 0.07, {})
    first_steps(model, 4)
    model.record_step(4, true_step[4])
    chosen = []
    for _ in range(60):  # the model measures what it chooses, first steps not counted
        k = model.best_k()
        assert k is not None
        chosen.append(k)
        model.record_step(k, true_step[k])
    assert chosen[0] < 4 and chosen[-1] == 2


def test_step_times_of_other_k_follow_the_machines_drift() -> None:
    model = cost_model(0.8, 0.1, {})
    first_steps(model, 1, 2)
    model.record_step(1, 2.0)
    model.record_step(2, 2.4)  # K = 2 costs 1.2x K = 1 ...
    for _ in range(60):  # ... then the machine gets twice as fast while only K = 1 runs
        model.record_step(1, 1.0)
    assert model.step_time(1) == pytest.approx(1.0, rel=1e-6)
    assert model.step_time(2) == pytest.approx(1.2, rel=1e-6)  # the ratio is kept, the level follows
    assert model.best_k() > 1
    # Times left stale would say K = 2 costs 2.4x K = 1 and pin K at 1:
    assert cost_model(0.8, 0.1, {1: 1.0, 2: 2.4}).best_k() == 1


def test_a_slow_first_step_does_not_keep_a_k_from_being_chosen() -> None:
    """The first step of each K pays one-off costs; counted, this one would price K = 4 at twice
    K = 3 and, as a K's time is refreshed only when it is chosen, keep it so for good."""
    model = cost_model(0.9, 0.05, {})
    for k, seconds in [(4, 2.0), (4, 1.0), (3, 0.95), (3, 0.95)]:  # the first K = 4 step is slow
        model.record_step(k, seconds)
    assert model.step_time(4) == 1.0 and model.best_k() == 8  # (longer chains borrow K = 4's time)
    counted = cost_model(0.9, 0.05, {})
    counted._first_step_seen = {3, 4}  # the old rule: every step counted
    for k, seconds in [(4, 2.0), (3, 0.95), (3, 0.95)]:
        counted.record_step(k, seconds)
    assert counted.best_k() == 3


def test_draft_time_is_fitted_as_a_fixed_part_plus_a_part_per_token() -> None:
    model = CostModel(8)
    for k in [1, 5, 2, 4] * 40:  # every call: 0.5 s fixed + 0.1 s per draft
        model.record_draft(k, 0.5 + 0.1 * k)
    assert model.t_draft == pytest.approx(0.1, rel=1e-6)
    assert model.t_draft_fixed == pytest.approx(0.5, rel=1e-6)
    for _ in range(300):  # then only K = 1, on a machine twice as slow: K = 1 is priced right,
        model.record_draft(1, 2 * 0.6)  # and some of it stays a fixed part
    assert model.t_draft_fixed + model.t_draft == pytest.approx(1.2, rel=1e-3)
    assert 0.1 < model.t_draft_fixed < 1.2


def test_a_fixed_draft_cost_does_not_pin_k_at_one() -> None:
    # Calls cost 0.5 + 0.05 K: per token a K = 1 call looks 0.55, eleven times a draft's share
    # in a K = 8 call. Counted per token that pins K at 1; the fitted line picks a longer chain.
    steps = {k: 1.0 + 0.02 * k for k in range(9)}
    per_token = cost_model(0.6, 0.55, steps)
    assert per_token.best_k() == 1
    fitted = cost_model(0.6, 0.05, steps)
    fitted.t_draft_fixed = 0.5
    assert fitted.best_k() >= 3


class ScriptedDrafter(Drafter):
    """A chain drafter that proposes token 0 K times (for the wrapper's K bookkeeping)."""

    def __init__(self) -> None:
        self.num_draft_tokens = 3
        self.asked: list[int] = []

    def prefill(self, prompt_ids, target_out) -> None:  # type: ignore[no-untyped-def]
        pass

    def propose(self, ctx):  # type: ignore[no-untyped-def]
        from specdec.drafters.base import DraftProposal

        self.asked.append(self.num_draft_tokens)
        return DraftProposal(torch.zeros(self.num_draft_tokens, dtype=torch.long))

    def on_verified(self, result) -> None:  # type: ignore[no-untyped-def]
        pass


def test_wrapper_sets_inner_k_and_probes_after_plain_steps() -> None:
    from specdec.drafters.base import DraftContext
    from specdec.sampling import SamplingParams

    inner = ScriptedDrafter()
    drafter = AdaptiveDrafter(inner, max_draft_tokens=4, probe_interval=3)
    ctx = DraftContext([1, 2, 3], SamplingParams(), max_draft_tokens=10)
    assert drafter.propose(ctx).num_tokens == 3  # no timings yet: the inner's own K
    # inject a cost model where drafting never pays
    drafter.cost.acceptance = [0.0] * 4
    drafter.cost.t_draft = 1.0
    drafter.cost.t_step = {k: 1.0 for k in range(5)}
    ks = [drafter.propose(ctx).num_tokens for _ in range(6)]
    assert ks == [0, 0, 1, 0, 0, 1]  # the third plain step probes with K = 1
    assert inner.asked == [3, 1, 1]


def test_wrapper_on_a_clock_settles_on_the_fastest_k() -> None:
    """Steps of K drafts cost 1 + 0.05 K, drafts 0.1 each (on a fake clock, the one
    scripts/adaptive_replay.py replays traces on); the first three drafts are always accepted,
    the fourth never: K = 3 gives 4 tokens per 1.45 s, the most of any K (K = 4: 4 per 1.6 s)."""
    from specdec.drafters.base import DraftContext
    from specdec.sampling import SamplingParams
    from specdec.verify.chain import VerifyResult

    now = [0.0]

    class Clocked(ScriptedDrafter):
        def propose(self, ctx):  # type: ignore[no-untyped-def]
            now[0] += 0.1 * self.num_draft_tokens
            return super().propose(ctx)

    drafter = AdaptiveDrafter(Clocked(), max_draft_tokens=8, initial_draft_tokens=6, clock=lambda: now[0])
    ctx = DraftContext([1, 2, 3], SamplingParams(), max_draft_tokens=8)
    chosen = []
    for _ in range(80):
        k = drafter.propose(ctx).num_tokens
        now[0] += 1.0 + 0.05 * k
        accepted = min(k, 3)
        drafter.on_verified(VerifyResult([0] * (accepted + 1), accepted, k, bonus=accepted == k))
        chosen.append(k)
    late = chosen[-40:]  # K = 4 is retried now and then (its alpha relaxes after full chains)
    assert set(late) <= {3, 4} and late.count(3) >= 30, chosen


@pytest.fixture(scope="module")
def pair(target_path, good_draft_path):  # type: ignore[no-untyped-def]
    return target_path, good_draft_path


@pytest.mark.parametrize("prompt_seed", [0, 1, 2])
def test_greedy_output_equals_plain_decoding(pair, prompt_seed: int) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(prompt_seed)
    target = load_model(pair[0], dtype="float32")
    draft = load_model(pair[1], dtype="float32")
    prompt = torch.randint(0, 96, (12,)).tolist()
    plain = SpeculativeGenerator(target).generate(prompt, max_new_tokens=60, ignore_eos=True)
    drafter = AdaptiveDrafter(DraftModelDrafter(draft, 2), max_draft_tokens=6, probe_interval=4)
    out = SpeculativeGenerator(target, drafter).generate(prompt, max_new_tokens=60, ignore_eos=True)
    assert out.token_ids == plain.token_ids
    assert len(set(drafter.chosen)) > 1  # K really changed during the request


def test_registry_builds_the_adaptive_wrapper(pair) -> None:  # type: ignore[no-untyped-def]
    target = load_model(pair[0], dtype="float32")
    drafter = make_drafter("adaptive", DrafterSpec(target, str(pair[1]), num_draft_tokens=3, dtype="float32"))
    assert isinstance(drafter, AdaptiveDrafter)
    assert drafter.num_draft_tokens == 6 and isinstance(drafter.inner, DraftModelDrafter)


def test_line_fit_recovers_a_line_and_follows_a_new_one() -> None:
    from specdec.linefit import LineFit

    fit = LineFit(decay=0.9)
    assert fit.line() is None and fit.means() == (0.0, 0.0, 0.0)
    for x in [1, 2, 3, 4] * 5:
        fit.add(x, 0.5 + 0.25 * x)
    a, b = fit.line()  # type: ignore[misc]
    assert (a, b) == (pytest.approx(0.5), pytest.approx(0.25))
    for x in [1, 3] * 100:  # the machine changed: old points fade
        fit.add(x, 2.0 + 1.0 * x)
    a, b = fit.line()  # type: ignore[misc]
    assert (a, b) == (pytest.approx(2.0, rel=1e-6), pytest.approx(1.0, rel=1e-6))
    assert fit.line(min_slope=3.0) == (0.0, 3.0)  # the floor on b, then a >= 0
    same_x = LineFit(decay=0.9)
    for _ in range(10):
        same_x.add(2, 1.0)
    assert same_x.line() is None and same_x.means()[:2] == (pytest.approx(2.0), pytest.approx(1.0))
    with pytest.raises(ValueError):
        LineFit(decay=1.0)
