"""How deep a draft tree grows: keep drafting while the next level still raises the expected tokens per second.

A verify pass of the streamed model costs `pass_s` whatever the tree's size (the link is the wall), and each draft
step costs `step_s`. With `a` the running acceptance rate (at a verified position that had drafted candidates, how
often the model's token was among them), a tree `d` levels deep is expected to yield `E(d) = 1 + a + ... + a^d`
tokens per pass. Level `d + 1` is drafted when the tokens it adds pay for its step:

    a^(d+1) * (pass_s + d * step_s) > E(d) * step_s

i.e. when tokens per second rise. Costs and the rate are running means over passes. Pure bookkeeping, no torch.
"""
from __future__ import annotations

DEFAULT_MAX_DEPTH = 32
_WARMUP_DEPTH = 4  # levels drafted before any cost has been measured
_DECAY = 0.7  # weight of the past in the running means


class DepthPolicy:
    """Decides, level by level, whether drafting one more level is worth its cost; learns from each pass."""

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH, fixed: bool = False) -> None:
        self.max_depth = max_depth
        self.fixed = fixed  # draft max_depth levels every pass (while the draft finds candidates)
        self.pass_s: float | None = None
        self.step_s: float | None = None
        self._accepted = 0.0  # decayed counts: positions whose token the draft had, and positions tried
        self._trials = 0.0

    @property
    def acceptance(self) -> float:
        """The running acceptance rate; a neutral 0.5 before anything was verified."""
        return (self._accepted + 0.5) / (self._trials + 1.0)

    def extend(self, depth: int) -> bool:
        """Draft level `depth + 1`?"""
        if depth >= self.max_depth:
            return False
        if depth == 0 or self.fixed:
            return True
        if self.pass_s is None or self.step_s is None:
            return depth < _WARMUP_DEPTH
        rate = self.acceptance
        expected_tokens = sum(rate ** level for level in range(depth + 1))
        return rate ** (depth + 1) * (self.pass_s + depth * self.step_s) > expected_tokens * self.step_s

    def observe(self, pass_s: float, step_s: float | None, accepted: int, trials: int) -> None:
        """Fold one pass in: its verify time, mean draft step time, and its accepted positions out of those tried."""
        self.pass_s = pass_s if self.pass_s is None else _DECAY * self.pass_s + (1 - _DECAY) * pass_s
        if step_s is not None:
            self.step_s = step_s if self.step_s is None else _DECAY * self.step_s + (1 - _DECAY) * step_s
        self._accepted = _DECAY * self._accepted + accepted
        self._trials = _DECAY * self._trials + trials
