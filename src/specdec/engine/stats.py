"""Per-request statistics of a speculative generation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SpecStats:
    """Counters and wall times of one ``generate`` call.

    ``mean_accepted_length`` (tau) is the number of tokens committed per verify pass, counting
    the recovered / bonus token: plain decoding has tau = 1, K accepted drafts give K + 1.

    A chain of K drafts is K tokens at K positions. A tree counts each of its nodes as a
    proposed token (``draft_tokens``, what the verify pass paid for) and each depth once as a
    position (``draft_positions``): the acceptance rate is accepted tokens per drafted position,
    so it reads the same for chains and trees.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # prefill + verify passes
    verify_steps: int = 0
    draft_tokens: int = 0  # proposed (tree: nodes)
    draft_positions: int = 0  # drafted depths (chain: = draft_tokens)
    accepted_tokens: int = 0
    committed_tokens: int = 0  # before truncation by EOS / max_new_tokens / stop strings
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0

    def record(self, num_drafted: int, num_accepted: int, num_nodes: int | None = None) -> None:
        """One verify pass over ``num_drafted`` positions (a tree's depth; it has ``num_nodes``)."""
        self.verify_steps += 1
        self.target_forwards += 1
        self.draft_tokens += num_drafted if num_nodes is None else num_nodes
        self.draft_positions += num_drafted
        self.accepted_tokens += num_accepted
        self.committed_tokens += num_accepted + 1
        while len(self.drafted_per_position) < num_drafted:
            self.drafted_per_position.append(0)
            self.accepted_per_position.append(0)
        for i in range(num_drafted):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += int(i < num_accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_positions if self.draft_positions else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.committed_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position, strict=True)]

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.total_s - self.prefill_s - self.draft_s - self.verify_s)

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.prefill_s
        return self.new_tokens / decode_s if decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in (
            "acceptance_rate",
            "mean_accepted_length",
            "per_position_acceptance",
            "overhead_s",
            "tokens_per_s",
        ):
            d[name] = getattr(self, name)
        return d

    def summary(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.total_s:.2f}s ({self.tokens_per_s:.1f} tok/s) | "
            f"target forwards {self.target_forwards} | acceptance {self.acceptance_rate:.1%} | "
            f"mean accepted length {self.mean_accepted_length:.2f} | "
            f"draft {self.draft_s:.2f}s verify {self.verify_s:.2f}s overhead {self.overhead_s:.2f}s"
        )
