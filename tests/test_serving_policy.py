"""SpeculationPolicy's measured-goodput guard, driven by a simulated engine (no models, no clock).

The simulated target pass costs a *step function* of the tokens it reads (like a CPU whose BLAS
kernels change blocking at some size), which the policy's linear cost fit cannot represent.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from specdec.serving.policy import SpeculationPolicy

MAX_K = 4
ALPHA = 0.8  # per-position acceptance of the simulated drafter
DRAFT_COST = 0.0002  # seconds per draft token and row
BOOKKEEPING = 0.0005  # seconds per step outside drafting and the pass
PROMPT = 120  # prompt tokens of a joining request


def step_cost(num_tokens: int) -> float:
    """Flat up to 8 tokens, then 4x: speculation at B = 8 pays the jump, plain does not."""
    return 0.010 if num_tokens <= 8 else 0.040


def flat_cost(num_tokens: int) -> float:
    """Memory-bound: extra verified tokens are free."""
    return 0.010


def simulate(
    policy: SpeculationPolicy,
    batch_sizes: list[int],
    cost: Callable[[int], float],
    rng: random.Random,
) -> list[tuple[int, int, int, float]]:
    """One engine step per entry of ``batch_sizes``, reporting to ``policy`` as BatchEngine does;
    every 16th step a request joins with a prompt of ``PROMPT`` tokens (its prefill is a pass too).

    Returns ``(batch_size, k, committed_tokens, seconds)`` per step."""
    steps = []
    for i, batch_size in enumerate(batch_sizes):
        if i % 16 == 0:
            policy.observe_pass(PROMPT, cost(PROMPT))
        k = policy.choose(batch_size)
        draft_s = DRAFT_COST * batch_size * k
        if k:
            policy.observe_draft(batch_size * k, draft_s)
        pass_s = cost(batch_size * (k + 1))
        policy.observe_pass(batch_size * (k + 1), pass_s)
        committed = 0
        for _ in range(batch_size):
            accepted = 0
            while accepted < k and rng.random() < ALPHA:
                accepted += 1
            policy.observe_acceptance(k, accepted)
            committed += accepted + 1  # accepted drafts + the target's own token
        seconds = draft_s + pass_s + BOOKKEEPING
        policy.observe_step(batch_size, k, committed, seconds)
        steps.append((batch_size, k, committed, seconds))
    return steps


def goodput(steps: list[tuple[int, int, int, float]]) -> float:
    return sum(s[2] for s in steps) / sum(s[3] for s in steps)


def first_steps(policy: SpeculationPolicy, batch_size: int, ks: list[int]) -> None:
    """One step of each K in ``batch_size``'s bucket: the guard does not count a first step (it
    pays one-off costs). Fast on purpose (10 000 tokens/s): counted, it would sway the tests."""
    for k in ks:
        policy.observe_step(batch_size, k, 1, 1e-4)


def test_guard_falls_back_to_plain_where_the_linear_model_is_wrong() -> None:
    policy = SpeculationPolicy(MAX_K)
    steps = simulate(policy, [8, 1] * 400, step_cost, random.Random(0))
    # The scenario is meaningful: the fitted line (flattened by the prefills) still says
    # speculation wins at B = 8, where it really takes 4x the pass time ...
    model_k = policy.model_k(8, measured=False)
    assert model_k > 0
    model_step_s = DRAFT_COST * 8 * model_k + step_cost(8 * (model_k + 1)) + BOOKKEEPING
    model_only = 8 * policy.expected_tokens(model_k) / model_step_s
    always_plain_8 = 8 / (step_cost(8) + BOOKKEEPING)
    assert model_only < 0.9 * always_plain_8
    # ... but the guard measured that and keeps B = 8 plain, exploring rarely.
    last_8 = [s for s in steps if s[0] == 8][-160:]
    assert sum(k == 0 for _, k, _, _ in last_8) >= 150
    assert goodput(last_8) >= 0.95 * always_plain_8
    # At B = 1 the pass cost is flat and speculation still runs (and more than doubles goodput).
    last_1 = [s for s in steps if s[0] == 1][-160:]
    assert sum(k > 0 for _, k, _, _ in last_1) >= 140
    assert goodput(last_1) >= 2 * (1 / (step_cost(1) + BOOKKEEPING))


def explorations(steps: list[tuple[int, int, int, float]], explored_arm: Callable[[int], bool]) -> tuple[int, float]:
    """How many steps used the explored arm, and their share of the wall time."""
    explored = [s for s in steps if explored_arm(s[1])]
    return len(explored), sum(s[3] for s in explored) / sum(s[3] for s in steps)


def test_exploration_keeps_trying_the_arm_not_taken_in_a_bounded_share_of_time() -> None:
    # Without back-off: about 1 / explore_every of the wall time, whichever arm is losing.
    fixed = SpeculationPolicy(MAX_K, explore_every=16, max_backoff=1)
    count, share = explorations(simulate(fixed, [8] * 600, step_cost, random.Random(1))[200:], bool)
    assert 3 <= count <= 20 and 0.03 <= share <= 1.25 / 16  # plain preferred at B = 8
    fixed = SpeculationPolicy(MAX_K, explore_every=16, max_backoff=1)
    flat = simulate(fixed, [1] * 600, flat_cost, random.Random(1))[200:]
    count, share = explorations(flat, lambda k: k == 0)  # speculation preferred: plain explored
    assert 10 <= count <= 40 and 0.03 <= share <= 1.25 / 16
    assert sum(s[1] > 0 for s in flat) >= 0.9 * len(flat)


def test_exploration_backs_off_while_it_keeps_confirming_the_choice() -> None:
    policy = SpeculationPolicy(MAX_K, explore_every=16, max_backoff=8)
    late = simulate(policy, [8] * 3000, step_cost, random.Random(1))[1500:]
    count, share = explorations(late, bool)
    assert count >= 1  # still explored ...
    assert share <= 1.25 / (16 * 8)  # ... in an eighth of the share without back-off
    policy = SpeculationPolicy(MAX_K, explore_every=16, max_backoff=8)
    late = simulate(policy, [1] * 3000, flat_cost, random.Random(1))[1500:]
    count, share = explorations(late, lambda k: k == 0)
    assert count >= 1 and share <= 1.25 / (16 * 8)


def test_untried_arms_are_tried_first_then_measurements_decide() -> None:
    policy = SpeculationPolicy(MAX_K)
    for tokens in (1, 5, 20, 40):
        policy.observe_pass(tokens, 0.010)  # flat cost: the model wants the longest drafts
    assert policy.model_k(4) == MAX_K
    assert policy.choose(4) == MAX_K  # nothing measured: the model's K
    policy.observe_step(4, MAX_K, 1, 1.0)  # its first step (one-off costs): not counted ...
    assert policy.choose(4) == MAX_K  # ... so it is tried once more
    policy.observe_step(4, MAX_K, 4, 0.010)  # 400 tokens/s, at the step time the line predicts
    assert policy.choose(4) == 0  # plain untried in this bucket: try it
    policy.observe_step(4, 0, 1, 1.0)  # its first step: not counted
    assert policy.choose(4) == 0
    policy.observe_step(4, 0, 4, 0.005)  # 800 tokens/s
    assert policy.choose(4) == 0  # measured plain beats the model's K
    assert policy.choose(5) == 0  # 4..7 share the bucket
    assert policy.choose(8) == MAX_K  # another bucket has its own (empty) estimates


def prefill_heavy_cost(num_tokens: int) -> float:
    """Flat up to 8 tokens (a verify pass of 5 costs one of 1), then steep: long prefills make
    the fitted line overrate what verifying a few more tokens costs."""
    return 0.010 if num_tokens <= 8 else 0.010 + 0.002 * num_tokens


class LineOnlyPolicy(SpeculationPolicy):
    """The policy without measured step times in its model (the fitted line only)."""

    def model_k(self, batch_size: int, measured: bool = True) -> int:
        return super().model_k(batch_size, measured=False)


def test_measured_step_times_correct_the_line_where_verification_is_flat() -> None:
    def rate(k: int) -> float:  # true goodput of always drafting k at B = 1
        return (1 + sum(ALPHA**i for i in range(1, k + 1))) / (
            DRAFT_COST * k + prefill_heavy_cost(k + 1) + BOOKKEEPING
        )

    assert rate(MAX_K) > 1.2 * rate(2)  # the longest chain truly pays most
    # The scenario is meaningful: with the line alone the policy settles on short chains ...
    line_only = simulate(LineOnlyPolicy(MAX_K), [1] * 600, prefill_heavy_cost, random.Random(4))[-200:]
    assert sum(k <= 2 for _, k, _, _ in line_only) >= 150
    # ... measured step times lead it to the longest chain, and about 30 % more goodput.
    steps = simulate(SpeculationPolicy(MAX_K), [1] * 600, prefill_heavy_cost, random.Random(4))[-200:]
    assert sum(k == MAX_K for _, k, _, _ in steps) >= 150
    assert goodput(steps) >= 0.9 * rate(MAX_K)
    assert goodput(steps) >= 1.2 * goodput(line_only)


def test_margin_keeps_plain_unless_speculation_is_clearly_better() -> None:
    policy = SpeculationPolicy(MAX_K, margin=0.05)
    first_steps(policy, 2, [0, MAX_K])
    policy.observe_step(2, 0, 2, 0.010)  # 200 tokens/s
    policy.observe_step(2, MAX_K, 2.06, 0.010)  # 3% better: within the margin
    assert policy.choose(2) == 0
    policy.observe_step(2, MAX_K, 3.0, 0.010)  # now clearly better
    assert policy.choose(2) == MAX_K


def test_guard_prefers_measured_speculation_when_the_model_says_plain() -> None:
    policy = SpeculationPolicy(MAX_K)
    for tokens in (1, 16, 32, 64, 80):
        policy.observe_pass(tokens, 0.001 * tokens)  # compute-bound line
    for _ in range(50):
        policy.observe_acceptance(MAX_K, 0)
    assert policy.model_k(16) == 0
    first_steps(policy, 16, [0, 1, 2])
    policy.observe_step(16, 0, 16, 0.016)  # 1000 tokens/s
    assert policy.choose(16) == 1  # no K > 0 measured here yet: K = 1 is tried
    policy.observe_step(16, 1, 16, 0.030)  # worse
    policy.observe_step(16, 2, 40, 0.016)  # 2500 tokens/s
    assert policy.choose(16) == 2  # the best measured K > 0 beats plain


def test_guard_follows_a_change_of_load_cost() -> None:
    policy = SpeculationPolicy(MAX_K)
    rng = random.Random(2)
    before = simulate(policy, [8] * 300, step_cost, rng)
    assert sum(k == 0 for _, k, _, _ in before[-64:]) >= 56
    after = simulate(policy, [8] * 300, flat_cost, rng)  # extra verified tokens become free
    assert sum(k > 0 for _, k, _, _ in after[-64:]) >= 56


def test_fixed_policy_always_drafts_max_k() -> None:
    policy = SpeculationPolicy(MAX_K, adaptive=False)
    steps = simulate(policy, [1, 3, 8, 16] * 40, step_cost, random.Random(3))
    assert policy.measured_goodput(8, MAX_K) is not None
    assert {k for _, k, _, _ in steps} == {MAX_K}
    policy.observe_step(8, 0, 1000, 0.001)  # even a far better plain measurement changes nothing
    assert policy.choose(8) == MAX_K
    assert SpeculationPolicy(0).choose(8) == 0


def test_acceptance_is_per_position_given_the_earlier_ones_passed() -> None:
    policy = SpeculationPolicy(MAX_K)
    rng = random.Random(4)
    for _ in range(400):
        accepted = 0
        while accepted < MAX_K and rng.random() < ALPHA:
            accepted += 1
        policy.observe_acceptance(MAX_K, accepted)
    # Each position is accepted with ALPHA once reached; counting unreached positions as
    # rejections would give about ALPHA ** (i + 1) instead (0.41 at the last position).
    for position in range(MAX_K):
        assert abs(policy.acceptance(position) - ALPHA) < 0.12, position
    assert abs(policy.expected_tokens(MAX_K) - sum(ALPHA**i for i in range(MAX_K + 1))) < 0.5


def test_a_cold_switch_to_speculation_is_not_counted_and_is_explored_once_more() -> None:
    policy = SpeculationPolicy(MAX_K, explore_every=4)
    first_steps(policy, 4, [0, MAX_K])
    policy.observe_step(4, 0, 4, 0.010)  # plain: 400 tokens/s
    policy.observe_step(4, MAX_K, 4, 0.020)  # speculation: 200 tokens/s, plain is chosen
    for _ in range(20):
        k = policy.choose(4)
        if k:
            break
        policy.observe_step(4, 0, 4, 0.010)
    assert k == MAX_K  # exploration is due
    policy.observe_step(4, MAX_K, 12, 0.300, warm=False)  # the draft model caught up: 40 tokens/s
    assert policy.measured_goodput(4, MAX_K) == 200.0  # not counted
    assert policy.choose(4) == MAX_K  # explored again, warm this time
    policy.observe_step(4, MAX_K, 12, 0.012)  # 1000 tokens/s
    assert policy.measured_goodput(4, MAX_K) > 1.05 * policy.measured_goodput(4, 0)  # type: ignore[operator]
    chosen = []
    for _ in range(16):  # now speculation is chosen, apart from an exploration of plain
        chosen.append(policy.choose(4))
        policy.observe_step(4, chosen[-1], 12 if chosen[-1] else 4, 0.012 if chosen[-1] else 0.010)
    assert sum(k > 0 for k in chosen) >= 13


def test_costly_cold_steps_keep_the_exploration_share_bounded() -> None:
    """Switching to speculation after plain steps costs a cold step (the draft model catches up
    on every row), here 20 plain steps' time. Explorations of speculation are spaced by their
    whole cost, cold step included, so they still take about 1 / explore_every of the time."""
    policy = SpeculationPolicy(MAX_K, explore_every=16, max_backoff=1)
    rng = random.Random(3)
    cold_cost, previous_k, steps = 0.2, 0, []
    for _ in range(3000):
        k = policy.choose(8)
        pass_s = step_cost(8 * (k + 1))
        committed = sum(1 + sum(1 for _ in range(k) if rng.random() < ALPHA) for _ in range(8))
        seconds = DRAFT_COST * 8 * k + pass_s + BOOKKEEPING
        cold = k > 0 and previous_k == 0
        if cold:
            seconds += cold_cost
        policy.observe_step(8, k, committed, seconds, warm=not cold)
        steps.append((8, k, committed, seconds))
        previous_k = k
    count, share = explorations(steps[1000:], bool)
    assert count >= 4  # still explored
    assert share <= 1.25 / 16


def test_draft_cost_is_a_fitted_line_once_calls_of_different_sizes_were_seen() -> None:
    policy = SpeculationPolicy(MAX_K)
    for _ in range(20):  # one size of call: time per token
        policy.observe_draft(4, 0.002 + 0.0001 * 4)
    assert policy.draft_cost(8) == pytest.approx(2 * (0.002 + 0.0001 * 4))
    for n in [1, 8, 4, 16] * 50:  # a fixed 2 ms per call plus 0.1 ms per token
        policy.observe_draft(n, 0.002 + 0.0001 * n)
    assert policy.draft_cost(1) == pytest.approx(0.0021, rel=1e-6)
    assert policy.draft_cost(16) == pytest.approx(0.0036, rel=1e-6)
    assert policy.draft_cost(0) == 0.0


def test_a_slow_first_step_does_not_hold_an_arm_down() -> None:
    # The first step of a batch size and K pays one-off costs (allocations, first calls), here
    # 50 times a steady step. Measured goodput pools tokens and seconds: counted, that step would
    # keep speculation under plain (8 against 100 tokens/s) until many more of its steps came in,
    # and an arm the guard has backed off gets few. It is not counted.
    policy = SpeculationPolicy(MAX_K)
    policy.observe_step(1, 0, 1, 0.1)  # plain's first step, slow too
    policy.observe_step(1, MAX_K, 4, 1.0)  # speculation's first step: 4 tokens/s
    policy.observe_step(1, 0, 1, 0.01)  # 100 tokens/s
    policy.observe_step(1, MAX_K, 4, 0.02)  # 200 tokens/s
    assert policy.measured_goodput(1, 0) == pytest.approx(100.0)
    assert policy.measured_goodput(1, MAX_K) == pytest.approx(200.0)
    assert policy.choose(1) == 0  # the slow first steps' time made an exploration of plain due
    policy.observe_step(1, 0, 1, 0.01)
    assert policy.choose(1) == MAX_K  # speculation measures better and is chosen
