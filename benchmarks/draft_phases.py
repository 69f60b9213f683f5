"""Where a model draft's time goes, pass by pass: its methods timed with the device synchronized at their ends, so
the phases add up to what a pass spends drafting (the synchronizing itself slows a step a little).

    with draft_phases() as passes:
        model.generate(...)
    print(phase_summary(passes))

Each pass's record: `queued` (the wait for the device's work when drafting began, every stream's: the store's
copies of the next pass's layers still in flight count), `propose` (the whole of drafting after that), `steps`, and
per phase its seconds, phases never overlapping (a phase called inside another counts as the outer one):
`catch-up` (feeding the accepted tokens, its forwards and read-back included), `forward` (each replayed or eager
forward of the tree's steps), `read-back + heap`, `policy choice`, `tree mask`; and `NAME on the device`, the
current stream's time between the phase's ends (CUDA events: host delays inside the phase count), and `graph
replay on the device`, the forward's CUDA-graph replays alone.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import statistics
import time

PHASES = {"forward": ("static_forward", "StaticForward", "run"),
          "read-back + heap": ("drafts", "ModelDraft", "_push"),
          "policy choice": ("drafts", "ModelDraft", "_choose"),
          "tree mask": ("tree", "DraftTree", "ancestry"),
          "catch-up": ("drafts", "ModelDraft", "_catch_up")}
# what a tree's steps spend, each step (the catch-up is once a tree)
STEP_PHASES = ("forward", "forward on the device", "graph replay on the device", "read-back + heap", "policy choice",
               "tree mask")


@contextlib.contextmanager
def draft_phases():
    """Patch the draft's methods while the block runs; yields the list that gets one dict per `propose` call."""
    import torch

    from tierstore.inference.decoding import drafts, static_forward, tree

    modules = {"drafts": drafts, "static_forward": static_forward, "tree": tree}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    passes: list[dict[str, float]] = []
    current: list[collections.defaultdict] = []  # the pass being drafted, if any
    inside: list[str] = []  # the phase running, if any
    replays: list[tuple] = []  # (start, end) events around each graph replay of the phase running

    def replay(function):
        @functools.wraps(function)
        def wrapper(self, *args, **kwargs):
            if inside != ["forward"]:
                return function(self, *args, **kwargs)
            ends = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ends[0].record()
            try:
                return function(self, *args, **kwargs)
            finally:
                ends[1].record()
                replays.append(ends)
        return wrapper

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if not current or inside:
                return function(*args, **kwargs)
            sync()
            start_s = time.perf_counter()
            inside.append(name)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if torch.cuda.is_available() else []
            if events:
                events[0].record()
            try:
                return function(*args, **kwargs)
            finally:
                if events:
                    events[1].record()
                sync()
                inside.clear()
                current[0][name] += time.perf_counter() - start_s
                if events:  # what the current stream spent between the phase's ends
                    current[0][f"{name} on the device"] += events[0].elapsed_time(events[1]) / 1e3
                for start, end in replays:  # and in its graph replays alone
                    current[0]["graph replay on the device"] += start.elapsed_time(end) / 1e3
                replays.clear()
        return wrapper

    def propose(function):
        @functools.wraps(function)
        def wrapper(self, *args, **kwargs):
            called_s = time.perf_counter()
            sync()
            record = collections.defaultdict(float, queued=time.perf_counter() - called_s)
            steps, start_s = self.steps, time.perf_counter()
            current.append(record)
            try:
                return function(self, *args, **kwargs)
            finally:
                sync()
                current.clear()
                record["propose"] = time.perf_counter() - start_s
                record["steps"] = self.steps - steps
                passes.append(dict(record))
        return wrapper

    saved = [(drafts.ModelDraft, "propose", drafts.ModelDraft.propose)]
    saved += [(getattr(modules[module], owner), attr, getattr(getattr(modules[module], owner), attr))
              for module, owner, attr in PHASES.values()]
    if torch.cuda.is_available():
        saved.append((torch.cuda.CUDAGraph, "replay", torch.cuda.CUDAGraph.replay))
        torch.cuda.CUDAGraph.replay = replay(torch.cuda.CUDAGraph.replay)
    drafts.ModelDraft.propose = propose(drafts.ModelDraft.propose)
    for name, (module, owner, attr) in PHASES.items():
        cls = getattr(modules[module], owner)
        setattr(cls, attr, timed(name, getattr(cls, attr)))
    try:
        yield passes
    finally:
        for cls, attr, function in saved:
            setattr(cls, attr, function)


def phase_summary(passes: list[dict[str, float]]) -> str:
    """The median pass's ms in each phase, and the median pass's ms a step in the tree's phases (medians: a
    warm-up's compile or graph recording does not move them)."""
    if not passes:
        return "no drafting"
    steps = sum(record["steps"] for record in passes)
    names = ["queued", "propose", *PHASES]
    median = ", ".join(f"{name} {statistics.median(r.get(name, 0.0) for r in passes) * 1e3:.2f}" for name in names)
    rest = statistics.median(r["propose"] - sum(r.get(name, 0.0) for name in PHASES) for r in passes)
    stepped = [r for r in passes if r["steps"]]
    per_step = ", ".join(f"{name} {statistics.median(r.get(name, 0.0) / r['steps'] for r in stepped) * 1e3:.3f}"
                         for name in STEP_PHASES) if stepped else "-"
    return (f"{len(passes)} passes, {steps} steps (median {statistics.median(r['steps'] for r in passes):.0f} a "
            f"pass); median pass (ms): {median}, unaccounted {rest * 1e3:.2f}; a step (median pass, ms): "
            f"{per_step}")

