"""Pure verification functions: greedy, rejection sampling, tree verification."""

from specdec.verify.chain import VerifyResult, residual_probs, verify_greedy, verify_rejection

__all__ = ["VerifyResult", "residual_probs", "verify_greedy", "verify_rejection"]
