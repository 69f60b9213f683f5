"""A timeline of a model's work, written as Chrome trace-event JSON (Perfetto and chrome://tracing open it).

One track per activity: each disk reader thread, the host->device copy stream, the compute stream (one event per
unit's forward), compute stalls (the gaps on the compute stream, each named for what it waited on), the loop's
waits in the store, passes, draft steps, and a marker per token. On CUDA, copy and compute times are CUDA events
on their streams, turned into microseconds when the trace is written; elsewhere they are `perf_counter` seconds.

Nothing here runs unless a trace was asked for: the store and the hooks call a tracer only when they have one.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from .files import write_atomic

TOKENS, PASSES, COMPUTE, STALLS, WAITS, COPY, DRAFT = (
    "tokens", "passes", "compute", "compute stalls", "loop waits", "host->device copy", "draft")
TRACK_ORDER = (TOKENS, PASSES, COMPUTE, STALLS, WAITS, COPY, DRAFT)
DISK_PREFIX = "disk reader "
MAX_EVENTS = 2_000_000  # past this (hours of tracing) events are counted, not kept
_MIN_STALL_US = 5.0  # a shorter gap on the compute stream is launch jitter, not a stall
_SPARE_EVENTS = 4096  # CUDA events made when tracing starts, so a pass records events without creating them

Stamp = Any  # perf_counter seconds (float), or a torch.cuda.Event recorded with timing


class Tracer:
    """Collects events from the loop, reader and copier threads; `write` resolves and saves them atomically."""

    def __init__(self, path: str, device: torch.device, meta: dict[str, Any] | None = None) -> None:
        self.path = path
        self.meta = dict(meta or {})
        self._device = device
        self._cuda = device.type == "cuda"
        self._origin_s = time.perf_counter()
        self._anchors: list[tuple[Any, float]] = []  # (CUDA event, perf_counter seconds when it passed)
        self._pending: list[tuple[str, str, str, Stamp, Stamp, dict[str, Any], int]] = []
        self._resolved: list[dict[str, Any]] = []
        self._stamps: list[Any] = []  # CUDA events handed out by `stamp` since the last write
        self._spare: list[Any] = []  # resolved ones, recorded again rather than created again
        self._dropped = 0
        self._passes = 0
        self._muted = False
        self._lock = threading.Lock()
        if self._cuda:
            self._spare = [torch.cuda.Event(enable_timing=True) for _ in range(_SPARE_EVENTS)]
            for event in self._spare:  # the CUDA event itself is created on its first record: do that now
                event.record()
        self.anchor()

    def anchor(self) -> None:
        """Tie the GPU's clock to the host's: wait for the device to be idle, then record an event. Called at the
        start of each generate, so drift between the two clocks never builds up over a long run."""
        if self._cuda:
            torch.cuda.synchronize(self._device)
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            event.synchronize()
            self._anchors.append((event, time.perf_counter()))

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Record nothing inside: a CUDA graph being captured (an event recorded there would be part of the graph,
        and the hooks' spans would stand for one replay only). The replays are traced as passes instead."""
        self._muted = True
        try:
            yield
        finally:
            self._muted = False

    def stamp(self) -> Stamp:
        """Now, on the compute stream: a recorded CUDA event on a GPU, `perf_counter` seconds elsewhere (None
        while muted)."""
        if self._muted:
            return None
        if not self._cuda:
            return time.perf_counter()
        event = self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)
        event.record()
        self._stamps.append(event)
        return event

    def span(self, track: str, name: str, start: Stamp, end: Stamp, **args: Any) -> None:
        """A complete event on `track` from `start` to `end`."""
        self._add("X", track, name, start, end, args)

    def instant(self, track: str, name: str, at: Stamp, **args: Any) -> None:
        """A marker on `track`."""
        self._add("i", track, name, at, None, args)

    def begin_pass(self) -> int:
        """The index of the pass starting now."""
        with self._lock:
            self._passes += 1
            return self._passes - 1

    def store_event(self, event: Any, prefix: str = "") -> None:
        """The store's callback (a `StoreEvent`): disk reads, host->device copies, and the loop's waits. `prefix`
        names a second store's tracks (the experts' store has its own readers and copy stream)."""
        if event.kind == "read":
            track = DISK_PREFIX + event.thread.rsplit("_", 1)[-1]
        else:
            track = COPY if event.kind == "copy" else WAITS
        self._add("X", prefix + track, event.kind, event.start, event.end,
                  {"unit": str(event.key), "bytes": event.nbytes, "tier": event.tier})

    def _add(self, phase: str, track: str, name: str, start: Stamp, end: Stamp, args: dict[str, Any]) -> None:
        if self._muted:
            return
        with self._lock:
            if len(self._pending) + len(self._resolved) >= MAX_EVENTS:
                self._dropped += 1
                return
            self._pending.append((phase, track, name, start, end, args, len(self._anchors) - 1))

    # -- writing --------------------------------------------------------------------------------------------
    def write(self) -> None:
        """Resolve the stamps recorded since the last write (waiting for the device), and write the whole trace
        to `path`, atomically. Call it between passes, from the loop's thread."""
        if self._cuda:
            torch.cuda.synchronize(self._device)
        with self._lock:
            pending, self._pending = self._pending, []
        for phase, track, name, start, end, args, anchor in pending:
            event = {"ph": phase, "name": name, "cat": track, "ts": self._us(start, anchor), "args": args}
            if phase == "X":
                event["dur"] = max(self._us(end, anchor) - event["ts"], 0.0)
            else:
                event["s"] = "t"  # a marker on its own track
            self._resolved.append(event)
        self._spare += self._stamps
        self._stamps = []
        pid = os.getpid()
        events = self._resolved + _stalls(self._resolved)
        tracks = _track_ids(event["cat"] for event in events)
        out = []
        for name, tid in tracks.items():
            out.append({"ph": "M", "name": "thread_name", "ts": 0, "pid": pid, "tid": tid, "args": {"name": name}})
            out.append({"ph": "M", "name": "thread_sort_index", "ts": 0, "pid": pid, "tid": tid,
                        "args": {"sort_index": tid}})
        out += [{**event, "pid": pid, "tid": tracks[event["cat"]]} for event in events]
        meta = {**self.meta, "dropped_events": self._dropped}
        write_atomic(self.path, json.dumps({"traceEvents": out, "displayTimeUnit": "ms",
                                            "otherData": meta}).encode())

    def _us(self, stamp: Stamp, anchor: int) -> float:
        """Microseconds since the tracer started."""
        if isinstance(stamp, float):
            return (stamp - self._origin_s) * 1e6
        event, host_s = self._anchors[anchor]
        return (host_s - self._origin_s) * 1e6 + event.elapsed_time(stamp) * 1e3


def _track_ids(tracks: Any) -> dict[str, int]:
    """Track name -> thread id, in TRACK_ORDER, then disk readers by number."""
    names = set(tracks)
    ordered = [track for track in TRACK_ORDER if track in names]
    ordered += sorted(names - set(ordered), key=lambda name: (len(name), name))
    return {name: index + 1 for index, name in enumerate(ordered)}


def _stalls(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gaps on the compute stream inside each pass, each named for what ended inside it: the unit's copy,
    its disk read, or neither (the host: Python, kernel launches, sampling)."""
    arrivals: dict[tuple[str, str], list[float]] = {}  # (copy or read, unit) -> when each ended
    for event in events:
        kind = "copy" if event["cat"] == COPY else "read" if event["cat"].startswith(DISK_PREFIX) else None
        if event["cat"] == WAITS:  # the loop waited for the unit: for its read when the disk served it
            kind = "read" if event["args"]["tier"] == "disk" else "copy"
        if kind is not None:
            arrivals.setdefault((kind, event["args"]["unit"]), []).append(event["ts"] + event["dur"])
    computes = sorted((e for e in events if e["cat"] == COMPUTE), key=lambda event: event["ts"])
    passes = sorted((e for e in events if e["cat"] == PASSES and e["ph"] == "X"), key=lambda event: event["ts"])
    stalls = []
    index = -1
    previous_end = 0.0
    for event in computes:  # both sorted: walk the passes alongside
        while index + 1 < len(passes) and passes[index + 1]["ts"] <= event["ts"]:
            index += 1
            previous_end = passes[index]["ts"]
        if index < 0 or event["ts"] >= passes[index]["ts"] + passes[index]["dur"]:
            continue  # a forward outside any pass (none, with hooks on the model)
        gap = event["ts"] - previous_end
        if gap >= _MIN_STALL_US:
            unit = event["args"]["unit"]

            def arrived(kind: str) -> bool:
                return any(previous_end < end <= event["ts"] + 1.0 for end in arrivals.get((kind, unit), ()))

            cause = "copy" if arrived("copy") else "disk read" if arrived("read") else "host"
            stalls.append({"ph": "X", "name": f"waiting for {cause}", "cat": STALLS, "ts": previous_end,
                           "dur": gap, "args": {"unit": unit, "cause": cause}})
        previous_end = event["ts"] + event["dur"]
    return stalls
