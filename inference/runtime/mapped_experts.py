"""Routed experts read in place by the device, from their slot or from host RAM over the link: no copy into a
slot, and no wait for the routing on the host.

Page-locked host RAM is mapped into a GPU's address space (unified addressing), so a kernel can read it over the
link, at about the copy engine's rate (50.7 against 52.8 GB/s on an H200: benchmarks/mapped_read.py). One view
(`span`) covers the device slots and the host copies of every expert as rows of `row_bytes`, and a table on the
device gives, per MoE layer and expert, the row where the expert's bytes start now: its slot's while it has one,
else its host copy's. A layer call of a few tokens (a decode step) gathers its routed experts' rows into one
buffer, from HBM for an expert in a slot and over the link for the others (only their bytes cross it), and runs
each (token, expert) pair's projections as batched matmuls, whole tokens' pairs at a time (at least GATHER_PAIRS):
the buffer then holds what the plan reserved for it, a decode step's experts, whatever the call's size. Experts
in GGML formats with a matrix-vector kernel checked reading at offsets (packed_experts.AT_OFFSETS_DEVICES) skip the
gather: the kernel reads each pair's blocks where they lie (`ExpertUnpacker.forward_in_blocks`). The
routing stays on the device: the host queues layer after layer while the device reads, and the call's shapes are
fixed.

The routed ids follow to the host without a wait and are counted there (`drain`; a step captured as a CUDA graph
logs them on the device instead, sent to the host behind each replay and read before a later one without a wait:
`replaying`), and the slots follow them (`admit`). The table is re-pointed from the store (`refresh`) after calls
that went through it, which may have changed what the slots hold.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Mapping, Sequence

import torch

from ...policies.experts import gather_pairs
from ...store import SlotPool, TieredStore
from ...transfer import mapped_view
from ..loading.skeleton import ExpertGroup
from .host_experts import expert_forward
from .packed_experts import ExpertUnpacker, multiplies_at_offsets

MAX_PAIRS = 32  # (token, expert) pairs a layer call reads in place; a longer call copies each expert once instead
ALIGN_BYTES = 512  # the widest row the gather reads, when every expert's place allows
ADMIT_AFTER = 2  # (token, expert) pairs routed to a missed expert, this call, before it is copied into a slot
ADMIT_PER_STEP = 8  # slot copies started per step (one call of each layer): a few percent of what a step reads


@dataclasses.dataclass(frozen=True)
class Served:
    """One layer call's routing once on the host: the layer, the routed experts (token-major), and how many of
    those (token, expert) pairs read their expert from a slot."""

    layer: int
    routed: list[int]
    from_slots: int


class MappedExperts:
    """The span, the table and the gather (see the module docstring). Holds every expert in the host tier (pinned
    there) until `close`.

    The slots follow the routing a step late: after each call's ids reach the host, the missed experts routed to
    most this call (at least ADMIT_AFTER pairs) are copied into slots through the store, whose policy (fed every
    routed expert as an access) picks the victims, at most ADMIT_PER_STEP a step. A victim's rows point at its
    host copy at once (its slot is overwritten only after the compute queued before), a copied expert's at its
    slot once the copy has landed."""

    def __init__(self, groups: Sequence[ExpertGroup], store: TieredStore, pool: SlotPool,
                 unpacker: ExpertUnpacker | None = None) -> None:
        """`unpacker`: for compressed experts (placed alike), the window each gather is dequantized into."""
        self.groups = tuple(groups)
        self._unpacker = unpacker
        self.store = store
        self.pool = pool
        self.device = pool.tensor.device
        self._keys = [key for group in groups for key in group.keys]
        self._where = {key: (layer, expert) for layer, group in enumerate(groups)
                       for expert, key in enumerate(group.keys)}
        self.layout = store.layouts[self._keys[0]]
        first = next(iter(self.layout.slots.values()))
        host = store.get_host_many(self._keys, count=False)
        try:
            starts = [next(iter(tensors.values())).data_ptr() - first.offset for tensors in host]
            slot_starts = [pool.tensor.data_ptr() + slot * pool.slot_bytes for slot in range(pool.count)]
            base = min(starts + slot_starts)
            self.row_bytes = math.gcd(ALIGN_BYTES, self.layout.nbytes, pool.slot_bytes,
                                      *(start - base for start in starts + slot_starts))
            if self.row_bytes % 8:
                raise ValueError(f"expert bytes start {self.row_bytes}-byte aligned; the gather reads 8-byte words")
            end = max(starts + slot_starts) + self.layout.nbytes
            self.span = span_view(base, end - base, self.row_bytes, self.device)
        except BaseException:
            store.release_host_many(self._keys)
            raise
        self._bytes = self.span.view(torch.uint8).view(-1)  # the span as bytes, for kernels reading it in blocks
        self._host_rows = [(start - base) // self.row_bytes for start in starts]  # by expert, as in self._keys
        self._slot_row0 = (pool.tensor.data_ptr() - base) // self.row_bytes
        self._row_steps = torch.arange(self.layout.nbytes // self.row_bytes, device=self.device)
        self._pair_rows = torch.arange(gather_pairs(groups[0].top_k), device=self.device)
        self.rows = torch.tensor(self._host_rows, device=self.device)  # expert (flat) -> its first row now
        self._index = {key: flat for flat, key in enumerate(self._keys)}
        self._first = [self._index[group.keys[0]] for group in groups]  # each layer's first expert, flat
        self._slotted: set[str] = set()  # experts the table points at a slot for
        self._landing: set[str] = set()  # experts being copied into a slot
        self._in_slots: list[frozenset[int]] = [frozenset() for _ in self.groups]
        self._admits = 0.0  # slot copies the steps so far allow, not yet started
        self.admitted = 0  # slot copies started (counted by the runner's stats)
        self._pending: deque[tuple[int, torch.Tensor, torch.cuda.Event | None, frozenset[int]]] = deque()
        # a captured step logs its routing here instead (a replay runs no Python), read after each replay
        self._log = torch.zeros((len(groups), MAX_PAIRS), dtype=torch.long, device=self.device)
        self._log_pairs = 0
        self._replayed = False
        # replays' logs on their way to the host: (pinned copy, its event, the slots each layer read from)
        self._logs: deque[tuple[torch.Tensor, torch.cuda.Event | None, tuple[frozenset[int], ...]]] = deque()
        self.refresh()

    def refresh(self) -> None:
        """Point the table at the slots as the store holds them now (the experts landed there), the rest at their
        host copies: after calls that went through the store."""
        landed = self.store.landed_on_device(self._keys)
        self._landing = {key for key in self._keys if self.store.on_device(key) and key not in landed}
        self._slotted = set()
        self._point({key: self._slot_row(tensors) for key, tensors in landed.items()},
                    {key: self._host_rows[flat] for key, flat in self._index.items() if key not in landed})

    def forward(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """The layer's routed experts on `hidden` (tokens, hidden), summed by their routing weights."""
        group = self.groups[layer]
        tokens, top_k = top_k_index.shape
        ids = top_k_index.reshape(-1)
        starts = self.rows.index_select(0, ids + self._first[layer])
        inputs = hidden.repeat_interleave(top_k, dim=0)
        out = self._in_blocks(group, starts, inputs)
        if out is None:
            step = gather_pairs(top_k)  # the gather holds this many experts at once (the plan reserves them)
            out = torch.cat([self._run_pairs(group, starts[first:first + step], inputs[first:first + step])
                             for first in range(0, ids.numel(), step)])
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self._log[layer, :ids.numel()].copy_(ids)
            self._log_pairs = ids.numel()
        else:
            self._note(layer, ids)
        return (out.float().view(tokens, top_k, -1) * top_k_weights[..., None].float()).sum(1).to(hidden.dtype)

    def _in_blocks(self, group: ExpertGroup, starts: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor | None:
        """Every pair's expert multiplied in its blocks where it lies (its rows start at `starts`), nothing
        gathered: for compressed experts whose formats have a matrix-vector kernel here, checked reading at offsets
        (packed_experts.py); None otherwise (or where it failed), for the gather."""
        if self._unpacker is None or not self._unpacker.in_blocks or getattr(group.module, "is_transposed", False) \
                or not multiplies_at_offsets(self.device):
            return None
        return self._unpacker.forward_in_blocks(group.module, [attr for attr, _ in group.attrs], self._bytes,
                                                starts, self.row_bytes, inputs)

    def _run_pairs(self, group: ExpertGroup, starts: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Each pair's expert (its rows start at `starts`) gathered into one buffer, run on the pair's input."""
        gathered = self.span.index_select(0, (starts[:, None] + self._row_steps).reshape(-1))
        raw = gathered.view(torch.uint8).view(starts.numel(), -1)
        if self._unpacker is not None:  # packed: dequantized into the window, a tensor at a time for all pairs
            self._unpacker.fill_slots(raw, self._pair_rows[:starts.numel()])
            weights = {attr: view[:starts.numel()] for (attr, _), view in zip(group.attrs, self._unpacker.views)}
        else:
            weights = {attr: raw[:, slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(starts.numel(),
                                                                                                 *slot.shape)
                       for (attr, _), slot in zip(group.attrs, self.layout.slots.values())}
        return expert_forward(group.module, weights, inputs.to(weights[group.attrs[0][0]].dtype))

    def drain(self, wait: bool = False) -> list[Served]:
        """The routing of the layer calls whose ids have reached the host (all of them, after a wait, with
        `wait`), oldest first."""
        ready = []
        while self._pending:
            layer, ids, event, in_slots = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self._pending.popleft()
            routed = ids.tolist()
            ready.append(Served(layer, routed, sum(expert in in_slots for expert in routed)))
        return ready

    def replaying(self) -> list[Served]:
        """Before a replay of a captured step: the routing logged by the replays before it that has reached the
        host, every layer's, without waiting. The last replay's log is sent now (its copy queued behind it), and
        may arrive a step later: the decode loop queues a step before reading the last one's token where launching
        takes the host long (graphed.py), so the last replay may still be running."""
        if self._replayed:
            self._send_log()
        self._replayed = True
        return self._logged(wait=False)

    def replays_done(self) -> list[Served]:
        """After the last replay of a call: the routing of every replay not yet given (a wait)."""
        if self._replayed:
            self._send_log()
        self._replayed = False
        return self._logged(wait=True)

    def _send_log(self) -> None:
        """Copy the last replay's routing log to the host behind it, with the slots that replay read from."""
        logged = self._log[:, :self._log_pairs]
        if self.device.type == "cuda":
            host = torch.empty(logged.shape, dtype=logged.dtype, pin_memory=True)
            host.copy_(logged, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = logged.clone(), None
        self._logs.append((host, event, tuple(self._in_slots)))

    def _logged(self, wait: bool) -> list[Served]:
        """The sent logs that have reached the host (all of them, after a wait, with `wait`), oldest first."""
        served = []
        while self._logs:
            host, event, in_slots = self._logs[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self._logs.popleft()
            served += [Served(layer, routed, sum(expert in in_slots[layer] for expert in routed))
                       for layer, routed in enumerate(host.tolist())]
        return served

    def admit(self, served: list[Served], heat: Mapping[tuple[int, int], int]) -> None:
        """Copy into slots the experts these calls read over the link that `heat` (pairs routed to each, this
        call) says keep coming back, hottest first, as many as the steps allow; point the table at those landed."""
        self._admits = min(self._admits + ADMIT_PER_STEP * len(served) / len(self.groups), ADMIT_PER_STEP)
        wanted = {}
        for call in served:
            for expert in set(call.routed) - self._in_slots[call.layer]:
                key = self.groups[call.layer].keys[expert]
                if heat.get((call.layer, expert), 0) >= ADMIT_AFTER and key not in self._landing:
                    wanted[key] = heat[call.layer, expert]
        if wanted and self._admits >= 1:
            started = self.store.prefetch(sorted(wanted, key=wanted.__getitem__, reverse=True)[:int(self._admits)])
            self._admits -= len(started)
            self.admitted += len(started)
            self._landing.update(started)
            evicted = [key for key in self._slotted if not self.store.on_device(key)]
            self._point({}, {key: self._host_rows[self._index[key]] for key in evicted})
        if self._landing:
            landed = self.store.landed_on_device(list(self._landing))
            self._landing.difference_update(landed)
            self._point({key: self._slot_row(tensors) for key, tensors in landed.items()}, {})

    def bytes_read(self, key: str) -> torch.Tensor:
        """The bytes the table leads to for expert `key` now (uint8, on the device): a check that it leads to
        the expert's own."""
        start = int(self.rows[self._index[key]])
        return self.span[start:start + len(self._row_steps)].view(torch.uint8).reshape(-1)

    def close(self) -> None:
        """Let the host tier manage the experts again."""
        self._pending.clear()
        self._logs.clear()
        self.store.release_host_many(self._keys)

    def _slot_row(self, tensors: Mapping[str, torch.Tensor]) -> int:
        return self._slot_row0 + self.pool.index(next(iter(tensors.values()))) * (self.pool.slot_bytes
                                                                                   // self.row_bytes)

    def _point(self, to_slots: Mapping[str, int], to_host: Mapping[str, int]) -> None:
        """Set the table's rows of these experts (queued on the compute stream, after the work queued so far)."""
        changed = {**to_slots, **to_host}
        if not changed:
            return
        self._slotted.update(to_slots)
        self._slotted.difference_update(to_host)
        index = torch.tensor([self._index[key] for key in changed])
        rows = torch.tensor(list(changed.values()))
        if self.device.type == "cuda":
            index, rows = index.pin_memory(), rows.pin_memory()
        self.rows.index_copy_(0, index.to(self.device, non_blocking=True), rows.to(self.device, non_blocking=True))
        layers = {self._where[key][0] for key in changed}
        in_slots: dict[int, set[int]] = {layer: set() for layer in layers}
        for key in self._slotted:
            layer, expert = self._where[key]
            if layer in in_slots:
                in_slots[layer].add(expert)
        for layer, experts in in_slots.items():
            self._in_slots[layer] = frozenset(experts)

    def _note(self, layer: int, ids: torch.Tensor) -> None:
        """Send the routed ids to the host without waiting (counted by `drain`)."""
        if self.device.type != "cuda":
            self._pending.append((layer, ids.clone(), None, self._in_slots[layer]))
            return
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((layer, host, event, self._in_slots[layer]))


def span_view(base: int, nbytes: int, row_bytes: int, device: torch.device) -> torch.Tensor:
    """The memory [base, base + nbytes) as rows of `row_bytes` (int64 words), addressable on `device`. On a GPU the
    range may join device memory and mapped host RAM: only the rows of either are ever read."""
    return mapped_view(base, (nbytes // row_bytes, row_bytes // 8), torch.int64, device)
