"""How large a draft tree grows: step by step, while the expected tokens per second still rise.

A model draft grows its tree best-first (as SpecExec does): each draft step adds the most promising candidates
anywhere in the tree and feeds them through the draft to find their children. A candidate's score is the chance that
the verifying model accepts the whole path to it: the product, along the path, of the measured acceptance of a
token the draft gave that probability at that rank among its siblings (`acceptance`: how often, at a verified node,
the child the draft ranked r and scored at p was the model's pick, in bins of p for the top-ranked child and for
the others, each bin leaning on its rank's overall rate until it has data of its own). A greedy model accepts a
draft's top token far more often than the draft's probability says when the draft is a copy of it, and far less
when the draft is weak; the bins learn either.

The policy decides each step from what it measured:
- a draft step's seconds by its width (`step_cost`): a draft runs a step over one of a few fixed widths (8, 16,
  32), the smallest holding the step's candidates, and on a GPU a step's time barely grows with its width (its
  forward is bound by kernel launches), where on a CPU it grows with it: so how many candidates a step takes adapts
  to the hardware;
- the verify pass's seconds as a function of its token count (`VerifyCurve`). For a streamed dense model it is flat
  until compute shows, so trees grow large; for a mixture-of-experts target each token brings its routed experts
  across the link, so the curve climbs (and flattens once every expert is moved);
- the tree's expected yield `E`: one (the bonus token every pass gets) plus the sum of its nodes' scores.

With `T` the drafting seconds so far this pass and `G_k` the summed scores of the `k` best candidates (known before
the step), the step adds the `k <= width` candidates that maximise

    (E + G_k) / (T + step_s(k) + verify_s(n + k))

and is drafted when that beats `E / (T + verify_s(n))`, i.e. when tokens per second rise. When a step does not pay,
candidates may still join the tree without feeding them (no draft step, only the verify cost): the same test
without `step_s`. The curve is trusted up to four times the largest tree measured, so trees grow by that factor
across passes while that pays, and a climbing cost is seen before the tree outgrows it.

A mixture-of-experts target may verify under an expert budget (`speculation.expert_budget`;
inference/runtime/expert_budget.py) that keeps the tree's best nodes only: its verify pass then costs about the same
whatever the tree, and the nodes past what it keeps yield nothing. So trees are capped at twice the nodes recent
passes kept (`observe_kept`). Pure bookkeeping, no torch.
"""
from __future__ import annotations

import bisect

DEFAULT_MAX_NODES = 1024
_WARMUP_STEPS = 4  # steps drafted before any cost has been measured
_DECAY = 0.7  # weight of the past in the running means of costs
_EXPLORE = 4  # the largest tree drafted is at most this many times the largest one measured
_BINS = 10  # acceptance is measured in this many bins of the draft's probability, for top-ranked children and others
_MEMORY = 500.0  # observations an acceptance bin remembers (older ones fade)
_KEPT_ROOM = 2.0  # under an expert budget, trees hold at most this many times the nodes recent passes kept
_KEPT_FLOOR = 8  # ... and at least this many


class VerifyCurve:
    """A verify pass's seconds by its token count: decayed means in power-of-two buckets of tokens, joined by
    straight lines and never falling with size. Below the smallest bucket measured, that bucket's time."""

    def __init__(self) -> None:
        self._buckets: dict[int, list[float]] = {}  # log2 bucket -> [weight, weighted tokens, weighted seconds]
        self._sizes: list[float] = []  # the buckets' mean tokens, ascending, and their seconds (never falling):
        self._times: list[float] = []  # made once a pass, read by every step's choice

    @property
    def largest_tokens(self) -> int:
        """The largest pass measured (mean tokens of its bucket); 0 before any."""
        return round(self._sizes[-1]) if self._sizes else 0

    def observe(self, tokens: int, seconds: float) -> None:
        """One verify pass of `tokens` that took `seconds`."""
        bucket = self._buckets.setdefault(max(tokens, 1).bit_length(), [0.0, 0.0, 0.0])
        bucket[:] = [_DECAY * bucket[0] + 1.0, _DECAY * bucket[1] + tokens, _DECAY * bucket[2] + seconds]
        points = sorted((tokens_sum / weight, seconds_sum / weight)
                        for weight, tokens_sum, seconds_sum in self._buckets.values())
        self._sizes, self._times = [size for size, _ in points], []
        for _, mean_s in points:  # never falling with size: a larger pass that ran faster was noise
            self._times.append(max(mean_s, self._times[-1]) if self._times else mean_s)

    def seconds(self, tokens: int) -> float | None:
        """The expected seconds of a pass of `tokens`; None before any pass, or past `_EXPLORE` times the largest."""
        if not self._buckets or tokens > _EXPLORE * max(self.largest_tokens, 1):
            return None
        sizes, times = self._sizes, self._times
        where = bisect.bisect_left(sizes, tokens)
        if where == 0:
            return times[0]
        if where == len(sizes):
            return times[-1]  # flat past the largest: a streamed pass costs its bytes, whatever its tokens
        left, right = sizes[where - 1], sizes[where]
        share = (tokens - left) / (right - left)
        return times[where - 1] + share * (times[where] - times[where - 1])


class TreePolicy:
    """Decides, step by step, how many candidates join the tree and whether drafting one more step is worth its
    cost; learns from each pass.

    `max_nodes` caps the drafted nodes of a tree (their activations must fit the device reserve); `fixed_steps`
    drafts that many steps every pass (`speculation.depth`) instead of deciding."""

    def __init__(self, max_nodes: int = DEFAULT_MAX_NODES, fixed_steps: int | None = None) -> None:
        self.max_nodes = max_nodes
        self.fixed_steps = fixed_steps
        self.curve = VerifyCurve()
        self.widths: tuple[int, ...] = ()  # the draft's step widths, ascending (set by the draft; () = one)
        self._step_s: dict[int, float] = {}  # decayed mean seconds of a step, by its width (0: the only one)
        self.kept: float | None = None  # running mean of the drafted nodes an expert budget kept per pass
        self._tried = [0.0] * (2 * _BINS)  # per bin of (top-ranked or not, probability): children verified, accepted
        self._taken = [0.0] * (2 * _BINS)
        self._pooled = [(0.0, 0.0), (0.0, 0.0)]  # (tried, taken) over all bins, for top-ranked children and others

    def acceptance(self, probability: float, rank: int) -> float:
        """How often the model accepts a drafted token the draft gave `probability` at `rank` among its siblings
        (0: its best), its parent accepted: the measured rate of that bin, shrunk towards the rate of all bins of
        that rank (which learns in a few passes), itself shrunk towards `probability` (one observation each)."""
        where = _bin(probability, rank)
        tried, taken = self._pooled[1 if rank else 0]
        pooled = (taken + probability) / (tried + 1.0)
        return (self._taken[where] + pooled) / (self._tried[where] + 1.0)

    def take(self, steps: int, nodes: int, scores: float, gains: list[float], drafted_s: float,
             feed: bool = True) -> int:
        """How many of the best candidates (their scores `gains`, best first) join the tree, with `feed` followed
        by a draft step for their children; 0: none (stop). `steps` drafted so far this pass, the tree's `nodes`
        (root excluded) and the sum of their `scores`, and the pass's drafting seconds so far."""
        gains = gains[:max(self.node_cap() - nodes, 0)]
        if not gains or gains[0] <= 0.0:
            return 0
        if self.fixed_steps is not None:
            return len(gains) if steps < self.fixed_steps or not feed else 0
        now_s = self.curve.seconds(nodes + 1)
        if self.step_s is None or now_s is None:
            return len(gains) if steps < _WARMUP_STEPS or not feed else 0
        expected = 1.0 + scores
        best_rate, best, gained = expected / (drafted_s + now_s), 0, 0.0
        for count, gain in enumerate(gains, 1):
            gained += gain
            next_s = self.curve.seconds(nodes + 1 + count)
            if next_s is None:  # past what was measured by more than the exploring factor: measure this size first
                break
            rate = (expected + gained) / (drafted_s + (self.step_cost(count) if feed else 0.0) + next_s)
            if rate > best_rate:
                best_rate, best = rate, count
        return best

    def node_cap(self) -> int:
        """The most drafted nodes a tree gets now: `max_nodes`, or fewer where an expert budget keeps fewer."""
        if self.kept is None:
            return self.max_nodes
        return min(self.max_nodes, max(int(_KEPT_ROOM * self.kept), _KEPT_FLOOR))

    def observe_kept(self, nodes: int) -> None:
        """A verify pass under an expert budget kept `nodes` of its drafted nodes."""
        self.kept = nodes if self.kept is None else _DECAY * self.kept + (1 - _DECAY) * nodes

    @property
    def step_s(self) -> float | None:
        """A step's seconds at the narrowest width measured; None before any."""
        return self._step_s[min(self._step_s)] if self._step_s else None

    def step_cost(self, candidates: int) -> float:
        """The expected seconds of a step feeding `candidates`: those measured at the narrowest width holding them,
        else at the widest narrower one measured (a wider step costs at least that: trying it measures it)."""
        width = self.width_for(candidates)
        if width in self._step_s:
            return self._step_s[width]
        narrower = [known for known in self._step_s if known < width]
        return self._step_s[max(narrower)] if narrower else self.step_s  # type: ignore[return-value]

    def width_for(self, candidates: int) -> int:
        """The width of the step that feeds `candidates` (0 before a draft set its widths)."""
        return narrowest(self.widths, candidates) if self.widths else 0

    def observe_step(self, seconds: float, candidates: int = 0) -> None:
        """One draft step's seconds, and how many candidates it fed (its width is the narrowest holding them)."""
        width = self.width_for(candidates)
        known = self._step_s.get(width)
        self._step_s[width] = seconds if known is None else _DECAY * known + (1 - _DECAY) * seconds

    def observe_pass(self, seconds: float, tokens: int, tried: list[tuple[float, int, bool]]) -> None:
        """One verify pass: its seconds and token count (the tree's nodes and its root), and for each drafted
        child of an accepted node, the draft's probability of it, its rank, and whether the model accepted it."""
        self.curve.observe(tokens, seconds)
        fade = 1.0 - 1.0 / _MEMORY
        for probability, rank, accepted in tried:
            where = _bin(probability, rank)
            self._tried[where] = fade * self._tried[where] + 1.0
            self._taken[where] = fade * self._taken[where] + float(accepted)
        self._pooled = [(sum(self._tried[first:first + _BINS]), sum(self._taken[first:first + _BINS]))
                        for first in (0, _BINS)]


def narrowest(widths: tuple[int, ...], candidates: int) -> int:
    """The narrowest of `widths` (ascending) that holds `candidates`; the widest where none does."""
    return next((width for width in widths if width >= candidates), widths[-1])


def _bin(probability: float, rank: int) -> int:
    return min(int(probability * _BINS), _BINS - 1) + (_BINS if rank else 0)
