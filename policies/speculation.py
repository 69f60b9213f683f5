"""How deep a draft tree grows: keep drafting while the next level still raises the expected tokens per second.

A verify pass of the streamed model costs `pass_s` whatever the tree's size (the link is the wall), and each draft
step costs `step_s`. With `a` the running acceptance rate (at a verified position that had drafted candidates, how
often the model's token was among them), a tree `d` levels deep is expected to yield `E(d) = 1 + a + ... + a^d`
tokens per pass. Level `d + 1` is drafted when the tokens it adds pay for its step:

    a^(d+1) * (pass_s + d * step_s) > E(d) * step_s

i.e. when tokens per second rise. Costs and the rate are running means over passes. Pure bookkeeping, no torch.

A mixture-of-experts target breaks the first assumption: its verify pass moves every distinct expert the tree's
tokens are routed to, so a larger tree costs more. With `growing_pass`, the policy fits the verify time to the
tree's size (a decayed least-squares line over passes, never falling with size) and drafts level `d + 1` only when
tokens per second still rise with that level's nodes costed:

    E(d + 1) / (pass_s(nodes + added) + (d + 1) * step_s) > E(d) / (pass_s(nodes) + d * step_s)
"""
from __future__ import annotations

DEFAULT_MAX_DEPTH = 32
_WARMUP_DEPTH = 4  # levels drafted before any cost has been measured
_DECAY = 0.7  # weight of the past in the running means


class DepthPolicy:
    """Decides, level by level, whether drafting one more level is worth its cost; learns from each pass."""

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH, fixed: bool = False, growing_pass: bool = False) -> None:
        self.max_depth = max_depth
        self.fixed = fixed  # draft max_depth levels every pass (while the draft finds candidates)
        self.growing_pass = growing_pass  # the verify pass costs more with more nodes (a mixture-of-experts target)
        self.pass_s: float | None = None
        self.step_s: float | None = None
        self._accepted = 0.0  # decayed counts: positions whose token the draft had, and positions tried
        self._trials = 0.0
        self._fit = [0.0] * 5  # decayed sums over passes: weight, nodes, seconds, nodes^2, nodes * seconds

    @property
    def acceptance(self) -> float:
        """The running acceptance rate; a neutral 0.5 before anything was verified."""
        return (self._accepted + 0.5) / (self._trials + 1.0)

    def extend(self, depth: int, nodes: int = 0, added: int = 0) -> bool:
        """Draft level `depth + 1`? `nodes`: the tree's drafted nodes so far; `added`: about how many the next level
        adds (used when the verify pass grows with the tree)."""
        if depth >= self.max_depth:
            return False
        if depth == 0 or self.fixed:
            return True
        if self.pass_s is None or self.step_s is None:
            return depth < _WARMUP_DEPTH
        rate = self.acceptance
        expected_tokens = sum(rate ** level for level in range(depth + 1))
        if self.growing_pass:
            now = expected_tokens / (self.verify_s(nodes) + depth * self.step_s)
            deeper = (expected_tokens + rate ** (depth + 1)) / (self.verify_s(nodes + added)
                                                                 + (depth + 1) * self.step_s)
            return deeper > now
        return rate ** (depth + 1) * (self.pass_s + depth * self.step_s) > expected_tokens * self.step_s

    def verify_s(self, nodes: int) -> float:
        """The expected verify time of a tree of `nodes` drafted nodes: the running mean, or under `growing_pass`
        the fitted line once passes of different sizes were seen (its slope never below zero)."""
        weight, sum_n, sum_s, sum_nn, sum_ns = self._fit
        mean_s = self.pass_s if self.pass_s is not None else 0.0
        if not self.growing_pass or weight == 0.0:
            return mean_s
        spread = sum_nn / weight - (sum_n / weight) ** 2
        if spread <= 1.0:  # every pass about the same size: no slope to see
            return mean_s
        slope = max((sum_ns / weight - sum_n / weight * sum_s / weight) / spread, 0.0)
        return sum_s / weight + slope * (nodes - sum_n / weight)

    def observe(self, pass_s: float, step_s: float | None, accepted: int, trials: int, nodes: int = 0) -> None:
        """Fold one pass in: its verify time, mean draft step time, its accepted positions out of those tried, and
        the tree's drafted nodes."""
        self._fit = [_DECAY * total + part for total, part in
                     zip(self._fit, (1.0, nodes, pass_s, nodes * nodes, nodes * pass_s))]
        self.pass_s = pass_s if self.pass_s is None else _DECAY * self.pass_s + (1 - _DECAY) * pass_s
        if step_s is not None:
            self.step_s = step_s if self.step_s is None else _DECAY * self.step_s + (1 - _DECAY) * step_s
        self._accepted = _DECAY * self._accepted + accepted
        self._trials = _DECAY * self._trials + trials
