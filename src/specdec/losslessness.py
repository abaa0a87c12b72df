"""Checks that speculative decoding with a given target, drafter and sampling setting is lossless.

Two checks, used by ``specdec check`` and by the test suite:

* greedy equality: speculative greedy output == plain greedy output, token for token;
* distribution: the empirical joint distribution of the first two generated tokens fits the
  exactly computed target distribution (chi-square goodness of fit and total variation).

The exact joint is ``p(t1) * p(t2 | t1)``, with ``p`` the target's processed (temperature,
top-k, top-p) distribution. For large vocabularies the second factor is computed for the most
likely first tokens only; the remaining mass forms one bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from specdec.engine.generator import SpeculativeGenerator
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams, logits_to_probs


@dataclass(frozen=True)
class FitResult:
    samples: int
    bins: int
    pvalue: float
    total_variation: float
    null_total_variation: float  # TV expected from sampling noise alone

    @property
    def passed(self) -> bool:
        return self.pvalue > 1e-3 and self.total_variation < 3 * self.null_total_variation


@torch.inference_mode()
def exact_two_token_joint(
    target: LoadedModel, prompt: list[int], params: SamplingParams, max_first_tokens: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(first_tokens (M,), joint (M, V))``: the exact probability of each (t1, t2) pair for
    the ``M`` most likely first tokens (all of them when ``max_first_tokens`` is None)."""
    T = len(prompt)
    ids = torch.tensor([prompt], device=target.device)
    logits = target(ids, torch.arange(T, device=target.device), target.new_cache(1, T + 2))
    first = logits_to_probs(logits[0, -1], params)  # (V,)
    order = first.argsort(descending=True)
    support = int((first > 0).sum())
    m = support if max_first_tokens is None else min(max_first_tokens, support)
    first_tokens = order[:m]  # (M,)
    batch = torch.cat([ids.expand(m, -1), first_tokens[:, None]], dim=1)  # (M, T+1)
    positions = torch.arange(T + 1, device=target.device)
    second = logits_to_probs(target(batch, positions, target.new_cache(m, T + 2))[:, -1], params)  # (M, V)
    joint = first[first_tokens, None] * second  # (M, V)
    return first_tokens.cpu().numpy(), joint.double().cpu().numpy()


def sample_two_tokens(gen: SpeculativeGenerator, prompt: list[int], n: int, progress: bool = False, **sampling) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """``n`` independent speculative samples of the first two generated tokens (seeds 0..n-1)."""
    seeds = range(n)
    if progress:
        from tqdm import tqdm

        seeds = tqdm(seeds, desc="sampling", unit="sample", leave=False)
    pairs = []
    for seed in seeds:
        out = gen.generate(prompt, max_new_tokens=2, seed=seed, ignore_eos=True, **sampling)
        pairs.append((out.token_ids[0], out.token_ids[1]))
    return pairs


def goodness_of_fit(pairs: list[tuple[int, int]], first_tokens: np.ndarray, joint: np.ndarray) -> FitResult:
    """Chi-square test of sampled pairs against ``joint``; cells with an expected count below 5
    and all pairs outside ``first_tokens`` are merged into one bin.

    Under the null each empirical frequency deviates from ``p`` by ``sqrt(2 p (1-p) / (pi N))`` on
    average, which gives the expected total variation ``null_total_variation``.
    """
    n = len(pairs)
    row = {int(t): i for i, t in enumerate(first_tokens)}
    counts = np.zeros_like(joint)
    outside = 0
    for a, b in pairs:
        if a in row:
            counts[row[a], b] += 1
        else:
            outside += 1
    c, p = counts.ravel(), joint.ravel()
    if c[p == 0].sum() > 0:  # a pair the target can never produce: certainly not lossless
        return FitResult(n, 0, 0.0, 1.0, 0.0)
    big = p * n >= 5
    rest_p = max(0.0, 1.0 - p[big].sum())
    f_obs = np.append(c[big], c[~big].sum() + outside)
    f_exp = np.append(p[big], rest_p) * n
    keep = f_exp > 0
    f_exp = f_exp[keep] * (f_obs[keep].sum() / f_exp[keep].sum())  # absorb float rounding
    pvalue = _chisquare_pvalue(f_obs[keep], f_exp) if keep.sum() > 1 else 1.0
    # Total variation over the same bins as the chi-square test (cells too rare to estimate
    # from n samples are pooled, so the distance measures what the samples can resolve).
    q = f_exp / n
    tv = 0.5 * float(np.abs(f_obs[keep] / n - q).sum())
    null_tv = 0.5 * float(np.sum(np.sqrt(2 * q * (1 - q) / (math.pi * n))))
    return FitResult(n, int(keep.sum()), pvalue, tv, null_tv)


def greedy_mismatch(gen: SpeculativeGenerator, plain: SpeculativeGenerator, prompt: list[int], max_new_tokens: int) -> int | None:
    """Index of the first token where speculative greedy differs from plain greedy, or None."""
    a = gen.generate(prompt, max_new_tokens=max_new_tokens).token_ids
    b = plain.generate(prompt, max_new_tokens=max_new_tokens).token_ids
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _chisquare_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square test (``scipy.stats.chisquare``'s p-value): the chi-square
    distribution's survival function, ``Q(dof / 2, statistic / 2)``, with ``dof = bins - 1``."""
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)))
