"""``specdec check``: is speculative decoding lossless for *this* pair and sampling setting?

Runs greedy equality on a few prompts and a statistical test of the first two generated
tokens against the exactly computed target distribution; prints PASS or FAIL with the figures
(exit status 0 or 1).
"""

from __future__ import annotations

import argparse
import random

from specdec.commands.common import add_model_arguments, build_generator, check_sampling_arguments
from specdec.engine import SpeculativeGenerator
from specdec.losslessness import exact_two_token_joint, goodness_of_fit, greedy_mismatch, sample_two_tokens
from specdec.sampling import SamplingParams

DEFAULT_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    def __init__(self):\n",
    "    for i in range(len(items)):\n",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.set_defaults(dtype="float32")
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the test")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--samples", type=int, default=2000, help="samples for the distribution test")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens compared per greedy prompt")
    p.add_argument("--first-tokens", type=int, default=32, help="first tokens enumerated exactly")
    p.set_defaults(seed=None)


def _prompts(gen: SpeculativeGenerator, texts: list[str] | None) -> list[list[int]]:
    if gen.target.tokenizer is not None:
        return [gen.encode(t) for t in (texts or DEFAULT_PROMPTS)]
    if texts:
        from specdec.cli import UserError

        raise UserError("--prompt needs a target folder with a tokenizer")
    rng = random.Random(0)
    vocab = gen.target.config.vocab_size
    return [[rng.randrange(vocab) for _ in range(n)] for n in (1, 4, 9, 16)]


def run(args: argparse.Namespace) -> int:
    check_sampling_arguments(args)
    if args.temperature == 0:
        from specdec.cli import UserError

        raise UserError("the distribution test needs --temperature > 0 (greedy is checked anyway)")
    gen = build_generator(args)
    plain = SpeculativeGenerator(gen.target)
    prompts = _prompts(gen, args.prompt)

    mismatches = [greedy_mismatch(gen, plain, p, args.max_new_tokens) for p in prompts]
    greedy_ok = all(m is None for m in mismatches)
    detail = ", ".join(f"prompt {i}: first difference at token {m}" for i, m in enumerate(mismatches) if m is not None)
    print(f"greedy equality: {sum(m is None for m in mismatches)}/{len(prompts)} prompts identical "
          f"({args.max_new_tokens} tokens each){'; ' + detail if detail else ''}  "
          f"{'PASS' if greedy_ok else 'FAIL'}")

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    prompt = prompts[0]
    first, joint = exact_two_token_joint(gen.target, prompt, SamplingParams(**sampling), args.first_tokens)
    pairs = sample_two_tokens(gen, prompt, args.samples, progress=True, **sampling)
    fit = goodness_of_fit(pairs, first, joint)
    rate = gen.generate(prompt, max_new_tokens=64, seed=0, **sampling).stats
    print(f"distribution of the first 2 tokens ({fit.samples} samples, {fit.bins} bins, "
          f"temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}): "
          f"chi-square p = {fit.pvalue:.3g}, total variation {fit.total_variation:.4f} "
          f"(sampling noise ~{fit.null_total_variation:.4f})  {'PASS' if fit.passed else 'FAIL'}")
    print(f"acceptance rate {rate.acceptance_rate:.1%}, mean accepted length {rate.mean_accepted_length:.2f} "
          f"(one sampled completion)")
    ok = greedy_ok and fit.passed
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1
