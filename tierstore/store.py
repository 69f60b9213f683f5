"""The three-tier weight store: device, host (pinned on CUDA) and disk, each within its byte budget.

The loop calls `get(key, position)` before computing a unit and `release(key)` after. `get` waits only for the
unit it needs and starts the prefetch of what the schedule says comes next: disk reads on a reader pool, host to
device copies on one copier thread (a CUDA copy stream there). Bookkeeping happens under one lock; bytes move
outside it.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from .errors import BudgetError, InvariantError
from .policies.eviction import EvictionPolicy
from .policies.planner import Plan
from .policies.registry import make_eviction, make_prefetch
from .tier import Key, Tier, TierStats
from .transfer import CPUTransfer, CUDATransfer
from .units import UnitLayout, UnitSource

log = logging.getLogger(__name__)


class BufferPool:
    """Keeps freed buffers for reuse by a unit of the same size, so steady state allocates (and pins) nothing."""

    def __init__(self, allocate: Callable[[int], torch.Tensor],
                 let_go: Callable[[torch.Tensor], None] | None = None,
                 fresh_fence: Callable[[], object] | None = None) -> None:
        """`let_go`: called with each buffer `trim` releases (the pinned arena takes its pieces back; the device
        allocator's cache is emptied before the next allocation). `fresh_fence`: the fence a newly allocated
        buffer is written after. PyTorch's device allocator hands out memory freed by work it has queued on the
        compute stream but not yet run (an activation, a buffer `trim` let go); the copy stream writing into
        it must wait for that work."""
        self._allocate = allocate
        self._let_go = let_go
        self._fresh_fence = fresh_fence
        self._free: dict[int, list[tuple[torch.Tensor, object]]] = {}

    def take(self, nbytes: int, live_bytes: int, budget_bytes: int | None) -> tuple[torch.Tensor, object]:
        """A buffer of `nbytes` and the fence after which it may be overwritten.

        `live_bytes` already counts the new unit; free buffers are released until live plus free fit the budget.
        """
        if nbytes in self._free:
            return self._pop(nbytes)
        self.trim(live_bytes, budget_bytes)
        with torch.inference_mode(False):  # a caller in inference mode must not make it an inference tensor
            buffer = self._allocate(nbytes)
        return buffer, self._fresh_fence() if self._fresh_fence is not None else None

    def trim(self, live_bytes: int, budget_bytes: int | None) -> None:
        """Release free buffers until live plus free bytes fit the budget."""
        while self._free and budget_bytes is not None and live_bytes + self.free_bytes > budget_bytes:
            buffer, _ = self._pop(next(iter(self._free)))
            if self._let_go is not None:
                self._let_go(buffer)

    @property
    def free_bytes(self) -> int:
        """Bytes held by free buffers (a handful of distinct sizes: counted, not tracked)."""
        return sum(nbytes * len(bucket) for nbytes, bucket in self._free.items())

    # Each change to `_free` is one operation, so that an interrupt (Ctrl-C lands between any two bytecodes of the
    # main thread) leaves the pool consistent, with no empty bucket behind for `close` to trip on.
    def _pop(self, nbytes: int) -> tuple[torch.Tensor, object]:
        bucket = self._free[nbytes]
        return self._free.pop(nbytes)[0] if len(bucket) == 1 else bucket.pop()

    def views(self, buffer: torch.Tensor, layout: UnitLayout) -> dict[str, torch.Tensor]:
        """`layout`'s tensors viewing `buffer`, one of this pool's (made outside inference mode: the store's
        views outlive any caller's)."""
        with torch.inference_mode(False):
            return layout.views(buffer)

    def give(self, buffer: torch.Tensor, free_after: object) -> None:
        """Return a buffer; it may be overwritten once `free_after` has passed."""
        bucket = self._free.get(buffer.numel())
        if bucket is None:
            self._free[buffer.numel()] = [(buffer, free_after)]
        else:
            bucket.append((buffer, free_after))


class SlotPool(BufferPool):
    """A fixed number of equal device buffers carved from one tensor, slot i at bytes [i * slot_bytes, ...): a
    kernel given the whole tensor, viewed as stacked slots, can index any unit by its slot. Never grows or shrinks:
    the tier's budget is the slots' bytes."""

    def __init__(self, tensor: torch.Tensor, slot_bytes: int) -> None:
        super().__init__(self._exhausted)
        self.tensor = tensor
        self.slot_bytes = slot_bytes
        self._views: dict[tuple[int, tuple], tuple[torch.Tensor, ...]] = {}  # (slot, places) -> views
        self.count = tensor.numel() // slot_bytes
        for index in reversed(range(self.count)):
            self.give(tensor[index * slot_bytes:(index + 1) * slot_bytes], None)

    def trim(self, live_bytes: int, budget_bytes: int | None) -> None:
        """The slots are one allocation, kept for the store's life."""

    def index(self, view: torch.Tensor) -> int:
        """The slot holding `view`, a tensor inside one slot."""
        return (view.data_ptr() - self.tensor.data_ptr()) // self.slot_bytes

    def views(self, buffer: torch.Tensor, layout: UnitLayout) -> dict[str, torch.Tensor]:
        """The slot's views for `layout`'s tensors, made once per slot and placement of tensors: a verify pass
        copies a hundred experts a layer into slots, and making their views anew cost about 35 us each."""
        key = (self.index(buffer), layout.places)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = tuple(super().views(buffer, layout).values())
        return dict(zip(layout.slots, views))

    def _exhausted(self, nbytes: int) -> torch.Tensor:
        raise InvariantError(f"every one of the {self.count} device slots is taken; the tier's budget should have "
                             f"made room first (a unit of {nbytes} bytes, slots of {self.slot_bytes})")


@dataclasses.dataclass(frozen=True)
class StoreEvent:
    """One thing the store did, for a trace: a unit read from disk ("read"), copied to the device ("copy"), or
    waited for by the loop ("wait"). `start` and `end` are `perf_counter` seconds, except a CUDA copy's: the timing
    events around it on the copy stream. `tier`: where the bytes came from (for a wait, the tier that served it)."""

    kind: str
    key: Key
    nbytes: int
    start: object
    end: object
    tier: str
    thread: str


@dataclasses.dataclass
class _Entry:
    """A unit's bytes in one tier."""

    buffer: torch.Tensor
    ready: Future
    tensors: dict[str, torch.Tensor] | None = None
    copy_fence: object = None
    free_after: object = None
    served_from: str | None = None


class TieredStore:
    """Units in device, host and disk tiers, placed and evicted as the plan says."""

    def __init__(self, source: UnitSource, layouts: dict[Key, UnitLayout], plan: Plan,
                 transfer: CPUTransfer | CUDATransfer, reader_threads: int = 4,
                 on_event: Callable[[StoreEvent], None] | None = None, device_pool: BufferPool | None = None,
                 copy_inline: bool = False) -> None:
        """`device_pool`: where device buffers come from (default: allocated as needed and reused); the experts'
        store passes fixed slots carved from one tensor, which the experts kernel indexes. `copy_inline`: a unit
        already in host RAM has its copy queued by the caller's thread instead of the copy thread (the experts'
        store, whose copies are asked for one layer at a time and waited for at once: a hand-off per expert to
        another thread cost about 0.1 ms of waiting each on an H200)."""
        self.source = source
        self.on_event = on_event  # called from the loop, reader and copier threads; None records nothing
        self.plan = plan
        self.layouts = layouts
        self.transfer = transfer
        self.schedule = list(plan.schedule)
        self.device = Tier("device", plan.device_weights_bytes,
                           make_eviction(plan.device_policy, self.schedule, set(plan.device_resident)))
        self.host = Tier("host", plan.host_budget_bytes,
                         make_eviction(plan.host_policy, self.schedule, set(plan.host_resident)))
        self.disk_stats = TierStats(budget_bytes=None, used_bytes=sum(layout.nbytes for layout in layouts.values()))
        self.disk_stats.peak_bytes = self.disk_stats.used_bytes
        self._prefetch = make_prefetch(plan.prefetch, plan.prefetch_depth)
        self._disk_prefetch = make_prefetch(plan.prefetch, plan.disk_prefetch_depth)  # disk reads run further ahead
        self._device_resident, self._host_resident = frozenset(plan.device_resident), frozenset(plan.host_resident)
        self._device_data: dict[Key, _Entry] = {}
        self._host_data: dict[Key, _Entry] = {}
        self._device_pool = device_pool or BufferPool(transfer.allocate_device, transfer.free_device,
                                                      transfer.compute_fence)
        self._host_pool = BufferPool(transfer.allocate_host, transfer.free_host)
        self._lock = threading.RLock()
        self._in_flight: list[tuple[Key, object, object, int]] = []  # copies queued: key, fence, timer, bytes
        self._readers = ThreadPoolExecutor(reader_threads, thread_name_prefix="tierstore-read")
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="tierstore-copy")
        self._copy_inline = copy_inline
        self._cuda = transfer.device.type == "cuda"
        # Host buffers not carved from a pinned arena are freed once their unit is resident on the device, so that
        # RAM holds a resident unit once (on a CPU both tiers are RAM).
        self._keeps_one_copy = getattr(transfer, "arena", None) is None
        # The host-resident units are read now, largest first, before any unit streams: a large one (a 72B
        # model's 2.5 GB output layer) takes its room in the pinned arena while the arena is still whole, and
        # the slots that stage units from disk come and go in the rest.
        with self._lock:
            for key in sorted(plan.host_resident, key=lambda key: -layouts[key].nbytes):
                self._start_host_load(key, required=True)

    # -- the loop's interface -------------------------------------------------------------------------------
    def get(self, key: Key, position: int | None = None) -> dict[str, torch.Tensor]:
        """The unit's tensors on the compute device; pinned until `release`. Starts the next prefetches. Inside a
        CUDA graph's capture (a resident layer recorded amid a streamed pass) only a unit already there is
        served, and nothing is started, waited for or counted: the replays ask again (`_capturing`)."""
        if self._capturing():
            with self._lock:
                entry = self._device_data[key]  # a KeyError fails the capture, and the layer stays eager
                self.device.pin(key)
            return entry.tensors  # type: ignore[return-value]
        start_s = time.perf_counter()
        while True:
            with self._lock:
                entry = self._device_data.get(key)
                if entry is None:
                    entry = self._start_device_load(key, required=False)
                if entry is None:  # no room now; with loads in flight that may only mean "not yet"
                    self._finish_copies(block=True)
                    pending = self._pending_loads()
                    entry = self._start_device_load(key, required=not pending)
                if entry is not None:
                    self.device.pin(key)
                    break
            wait(pending)
        try:
            entry.ready.result()
        except BaseException:
            self._forget_failed_load(key)
            raise
        end_s = time.perf_counter()
        with self._lock:
            self._finish_copies(block=False)
            served_from = self._count(key, entry, end_s - start_s)
            if self.on_event is not None and served_from is not None:
                self.on_event(StoreEvent("wait", key, self.layouts[key].nbytes, start_s, end_s, served_from,
                                         threading.current_thread().name))
            self.device.access(key)
            if position is not None:
                self._start_device_loads(self._prefetch.next_keys(self.schedule, position, self._stays_on_device))
                for next_key in self._disk_prefetch.next_keys(self.schedule, position, self._stays_in_memory):
                    if next_key in self._device_data or next_key in self._host_data:
                        continue
                    if self._start_host_load(next_key, required=False, served_from="disk") is None:
                        break
        if entry.copy_fence is not None:  # once the compute stream waited, later reads are ordered after it
            self.transfer.wait_on_compute(entry.copy_fence)
            entry.copy_fence = None
        return entry.tensors  # type: ignore[return-value]  (a device entry always has its views)

    def get_many(self, keys: list[Key]) -> list[dict[str, torch.Tensor]]:
        """`get` for several units (no schedule prefetch): those already on the device, loaded and ordered, are
        pinned and counted under one lock; the rest go through `get`. On an error, nothing stays pinned."""
        found: list[dict[str, torch.Tensor] | None] = [None] * len(keys)
        with self._lock:
            for index, key in enumerate(keys):
                entry = self._device_data.get(key)
                if entry is None or entry.served_from is not None or entry.copy_fence is not None \
                        or not entry.ready.done() or entry.ready.exception() is not None:
                    continue
                self.device.pin(key)
                self._count(key, entry, 0.0)  # a device hit: served_from is None
                self.device.access(key)
                found[index] = entry.tensors
        try:
            for index, key in enumerate(keys):
                if found[index] is None:
                    found[index] = self.get(key)
        except BaseException:
            self.release_many([key for key, tensors in zip(keys, found) if tensors is not None])
            raise
        return found  # type: ignore[return-value]

    def release_many(self, keys: list[Key]) -> None:
        """`release` for several units, under one lock."""
        with self._lock:
            for key in keys:
                self.device.unpin(key)

    def on_device(self, key: Key) -> bool:
        """Whether `key` is in the device tier, or on its way there."""
        return key in self._device_data

    def device_addresses(self, keys: Iterable[Key]) -> tuple[int, ...]:
        """Where each of `keys` sits on the device (its buffer's address; 0 where it is not there): what a CUDA
        graph recorded over them reads. Nothing is pinned, counted or waited for."""
        with self._lock:
            entries = [self._device_data.get(key) for key in keys]
            return tuple(0 if entry is None else entry.buffer.data_ptr() for entry in entries)

    def landed_on_device(self, keys: list[Key]) -> dict[Key, dict[str, torch.Tensor]]:
        """Of `keys`, the device tensors of those whose copy there has finished; nothing is pinned, counted or
        waited for. A caller that reads them without `get` relies on eviction's fence: a unit evicted later is
        overwritten only after the compute queued before its eviction."""
        with self._lock:
            entries = {key: self._device_data.get(key) for key in keys}
            return {key: entry.tensors for key, entry in entries.items()
                    if entry is not None and entry.ready.done() and entry.ready.exception() is None
                    and self.transfer.done(entry.copy_fence)}

    def in_host(self, keys: list[Key]) -> bool:
        """Whether every one of `keys` has been read into host RAM (none still on its way, none missing)."""
        with self._lock:
            entries = (self._host_data.get(key) for key in keys)
            return all(entry is not None and entry.ready.done() for entry in entries)

    def count_served(self, routed: list[Key], device_hits: int, host_bytes: int) -> None:
        """Requests for `routed` served without `get` (the device reading experts in place): `device_hits` of
        them from the device tier, the others (`host_bytes`) from host RAM, a device miss and a host hit each.
        Each is an access for the device tier's policy, as through `get`."""
        with self._lock:
            for key in routed:
                self.device.access(key)
            self.device.stats.hits += device_hits
            self.device.stats.misses += len(routed) - device_hits
            self.host.stats.hits += len(routed) - device_hits
            self.host.stats.bytes_out += host_bytes

    def get_host_many(self, keys: list[Key], count: bool = True) -> list[dict[str, torch.Tensor]]:
        """The units' tensors in host RAM, read from disk when not there (a unit also on the device is served
        from RAM all the same: the caller computes on the host); pinned in the host tier until `release_host_many`.
        Each request counts as a host hit, or as a host miss served by the disk (unless not `count`)."""
        entries: list[_Entry] = []
        try:
            for key in keys:
                with self._lock:
                    entry = self._host_data.get(key)
                    if entry is None:
                        entry = self._start_host_load(key, required=True, served_from="disk")
                    self.host.pin(key)  # beside the read's own pin, which it drops when done
                    entries.append(entry)
            for key, entry in zip(keys, entries):
                entry.ready.result()
                with self._lock:
                    if entry.served_from == "disk":
                        self.host.stats.misses += count
                        self.disk_stats.hits += count
                        entry.served_from = None
                    else:
                        self.host.stats.hits += count
                    self.host.access(key)
                    if entry.tensors is None:
                        with torch.inference_mode(False):
                            entry.tensors = self.layouts[key].views(entry.buffer)
        except BaseException:
            self.release_host_many(keys[:len(entries)])
            raise
        return [entry.tensors for entry in entries]  # type: ignore[misc]

    def release_host_many(self, keys: list[Key]) -> None:
        """The host computation with `keys` is done (see `get_host_many`)."""
        with self._lock:
            for key in keys:
                self.host.unpin(key)

    def prefetch(self, keys: list[Key]) -> list[Key]:
        """Start loading `keys` onto the device, in order, without waiting; stops at the first for which there is
        no room now. Returns the keys whose loads it started."""
        with self._lock:
            return self._start_device_loads(keys)

    def release(self, key: Key) -> None:
        """The loop is done computing with `key`. Its buffer is overwritten only after the compute queued before
        its eviction has finished: eviction records that fence, so a unit that stays resident costs nothing."""
        with self._lock:
            self.device.unpin(key)

    def replan(self, plan: Plan) -> None:
        """Carry out a new plan for the device tier (e.g. a larger reserve for the KV cache): new budget and
        policy, evicting what no longer fits. Call between passes, when no unit is in use."""
        with self._lock:
            self._finish_copies(block=True)
            self.device.replace_policy(make_eviction(plan.device_policy, self.schedule, set(plan.device_resident)))
            self._device_resident = frozenset(plan.device_resident)
            self._evict_from_device(self.device.set_budget(plan.device_weights_bytes))
            self._device_pool.trim(self.device.used_bytes, plan.device_weights_bytes)
            self._prefetch = make_prefetch(plan.prefetch, plan.prefetch_depth)  # as deep as the new room allows
            self.plan = plan

    def replace_device_policy(self, policy: EvictionPolicy) -> None:
        """A new eviction policy for the device tier (placement and budget unchanged); call between passes."""
        with self._lock:
            self.device.replace_policy(policy)

    def close(self) -> None:
        """Stop the background threads (pending loads finish first) and give the memory back."""
        self._readers.shutdown(wait=True)
        self._copier.shutdown(wait=True)
        with self._lock:
            self._finish_copies(block=True)
            self._device_data.clear()
            self._host_data.clear()
            self._device_pool.trim(0, 0)
            self._host_pool.trim(0, 0)
        arena = getattr(self.transfer, "arena", None)
        if arena is not None:
            arena.release()

    def reset_counters(self) -> None:
        """Start every tier's counters afresh (a new generate call); placement is untouched."""
        with self._lock:
            for stats in self.tier_stats().values():
                stats.reset()

    def tier_stats(self) -> dict[str, TierStats]:
        """Counters per tier: device, host, disk."""
        return {"device": self.device.stats, "host": self.host.stats, "disk": self.disk_stats}

    # -- loading --------------------------------------------------------------------------------------------
    def _start_device_load(self, key: Key, required: bool) -> _Entry | None:
        nbytes = self.layouts[key].nbytes
        host_entry = self._host_data.get(key)
        served_from = "disk"
        if host_entry is not None:  # a unit read ahead from disk counts as served by the disk, once
            served_from, host_entry.served_from = host_entry.served_from or "host", None
        if host_entry is None:
            host_entry = self._start_host_load(key, required)
            if host_entry is None:
                return None
        victims = self._room(self.device, key, nbytes, required)
        if victims is None or (not required and not self._device_resident.isdisjoint(victims)):
            return None  # a prefetch waits rather than evict a unit the plan keeps: it would be copied again
        self._evict_from_device(victims)
        self.device.admit(key, nbytes)
        buffer, free_after = self._device_pool.take(nbytes, self.device.used_bytes, self.device.budget_bytes)
        tensors = self._device_pool.views(buffer, self.layouts[key])
        entry = _Entry(buffer, Future(), tensors=tensors, served_from=served_from)
        self._device_data[key] = entry
        self.device.pin(key)
        self.host.pin(key)
        if self._copy_inline and host_entry.ready.done() and host_entry.ready.exception() is None:
            entry.ready = _done_now(self._copy, key, host_entry, entry, free_after)
        else:
            entry.ready = self._copier.submit(self._copy, key, host_entry, entry, free_after)
        return entry

    def _start_device_loads(self, keys: list[Key]) -> list[Key]:
        """Start the device loads of `keys` not there yet, in order, until one finds no room (so that loads keep
        the order asked for); returns those started. A unit is never evicted to make room for one needed after
        it: each key stays pinned while the later ones look for room. Called under the lock."""
        started, held = [], []
        missing = [key for key in keys if key not in self._device_data]
        if len(missing) > 1:  # room for all of them at once, when there is some without any of `keys` going
            present = [key for key in keys if key in self._device_data]
            for key in present:
                self.device.pin(key)
            try:  # one walk of the policy, not one per unit (an MoE layer's hundred missed experts)
                victims = self.device.plan_room(sum(self.layouts[key].nbytes for key in missing))
            finally:
                for key in present:
                    self.device.unpin(key)
            if victims and self._device_resident.isdisjoint(victims):
                self._evict_from_device(victims)
        try:
            for key in keys:
                if key not in self._device_data:
                    if self._start_device_load(key, required=False) is None:
                        break
                    started.append(key)
                self.device.pin(key)
                held.append(key)
        finally:
            for key in held:
                self.device.unpin(key)
        return started

    def _start_host_load(self, key: Key, required: bool, served_from: str | None = None) -> _Entry | None:
        nbytes = self.layouts[key].nbytes
        # Host units still being copied hold their pins: when they are all that is in the way, let them finish.
        victims = self._room(self.host, key, nbytes, required,
                             make_room=(lambda: self._finish_copies(block=required)) if self._in_flight else None)
        if victims is None:
            return None
        for victim in victims:
            self._remove(self.host, self._host_data, self._host_pool, victim)
        self.host.admit(key, nbytes)
        buffer, _ = self._host_pool.take(nbytes, self.host.used_bytes, self.host.budget_bytes)
        entry = _Entry(buffer, Future(), served_from=served_from)
        self._host_data[key] = entry
        self.host.pin(key)
        entry.ready = self._readers.submit(self._read, key, buffer)
        return entry

    @staticmethod
    def _room(tier: Tier, key: Key, nbytes: int, required: bool,
              make_room: Callable[[], None] | None = None) -> list[Key] | None:
        """The victims that make room for `key` in `tier`; None (or, if required, BudgetError) when pins forbid.
        `make_room`, when given, runs once before a second try."""
        victims = tier.plan_admit(key, nbytes)
        if victims is None and make_room is not None:
            make_room()
            victims = tier.plan_admit(key, nbytes)
        if victims is None and required:
            raise BudgetError(f"{tier.name} tier: no room for unit {key!r} ({nbytes} bytes): every unit held is "
                              f"in use; raise the {tier.name} budget or lower the prefetch depth")
        return victims

    def _read(self, key: Key, buffer: torch.Tensor) -> None:
        start_s = time.perf_counter()
        try:
            self.source.read_into(key, buffer)
        finally:
            with self._lock:
                self.host.unpin(key)
        end_s = time.perf_counter()
        with self._lock:
            self.host.stats.bytes_in += buffer.numel()
            self.host.stats.transfer_s += end_s - start_s
            self.disk_stats.bytes_out += buffer.numel()
            self.disk_stats.transfer_s += end_s - start_s
        if self.on_event is not None:
            self.on_event(StoreEvent("read", key, buffer.numel(), start_s, end_s, "disk",
                                     threading.current_thread().name))

    def _copy(self, key: Key, host_entry: _Entry, entry: _Entry, free_after: object) -> None:
        try:
            host_entry.ready.result()
            entry.copy_fence, timer = self.transfer.copy(entry.buffer, host_entry.buffer, free_after)
        except BaseException:
            with self._lock:
                self.host.unpin(key)
                self.device.unpin(key)
            raise
        if self.on_event is not None:
            self.on_event(StoreEvent("copy", key, entry.buffer.numel(), *timer, "host",
                                     threading.current_thread().name))
        with self._lock:
            # The device copy is ordered by its fence from here on; the host bytes stay pinned until it is done.
            self.device.unpin(key)
            self._in_flight.append((key, entry.copy_fence, timer, entry.buffer.numel()))
            self._finish_copies(block=False)

    def _finish_copies(self, block: bool) -> None:
        """Release the host pins of finished copies and count them; with `block`, wait for all of them."""
        still: list[tuple[Key, object, object, int]] = []
        for key, fence, timer, nbytes in self._in_flight:
            if block:
                self.transfer.wait_on_host(fence)
            if still or not self.transfer.done(fence):  # copies finish in order on one stream
                still.append((key, fence, timer, nbytes))
                continue
            self.host.unpin(key)
            self.device.stats.bytes_in += nbytes
            self.host.stats.bytes_out += nbytes
            self.device.stats.transfer_s += self.transfer.elapsed_s(timer)
            if self._keeps_one_copy and key in self._device_resident and key not in self._host_resident \
                    and key in self._host_data and not self.host.pinned(key):
                self._remove(self.host, self._host_data, None, key)  # resident on the device: RAM holds it once
        self._in_flight = still

    def _count(self, key: Key, entry: _Entry, waited_s: float) -> str | None:
        """Each request is served by exactly one tier: a hit there, a miss in the tiers above it. Returns the tier
        below the device that served it, None for a device hit."""
        served_from = entry.served_from
        if served_from is None:
            self.device.stats.hits += 1
            return None
        self.device.stats.misses += 1
        if entry.served_from == "host":
            self.host.stats.hits += 1
            self.host.stats.stall_s += waited_s
        else:
            self.host.stats.misses += 1
            self.disk_stats.hits += 1
            self.disk_stats.stall_s += waited_s
        entry.served_from = None
        return served_from

    def _capturing(self) -> bool:
        return self._cuda and torch.cuda.is_current_stream_capturing()

    def _stays_on_device(self, key: Key) -> bool:
        """Resident on the device and there: prefetch looks past it (a streamed unit that is there still counts)."""
        return key in self._device_resident and key in self._device_data

    def _stays_in_memory(self, key: Key) -> bool:
        return self._stays_on_device(key) or (key in self._host_resident and key in self._host_data)

    def _pending_loads(self) -> list[Future]:
        """Reads and copies still running, which hold pins."""
        return [entry.ready for data in (self._host_data, self._device_data) for entry in data.values()
                if not entry.ready.done()]

    def _evict_from_device(self, victims: list[Key]) -> None:
        """Drop device units; their buffers wait for the compute queued so far (called on the compute thread)."""
        if not victims:
            return
        fence = self.transfer.compute_fence()
        for victim in victims:
            self._device_data[victim].free_after = fence
            self._remove(self.device, self._device_data, self._device_pool, victim)

    @staticmethod
    def _remove(tier: Tier, data: dict[Key, _Entry], pool: BufferPool | None, key: Key) -> None:
        """Remove `key` from `tier`; its buffer goes to `pool` for reuse, or (no pool) back to the allocator."""
        entry = data.pop(key)
        tier.remove(key)
        if pool is not None:
            pool.give(entry.buffer, entry.free_after)

    def _forget_failed_load(self, key: Key) -> None:
        """Forget a unit whose load failed, in both tiers, so a later request reads it again."""
        with self._lock:
            self.device.unpin(key)
            for tier, data, pool in ((self.device, self._device_data, self._device_pool),
                                     (self.host, self._host_data, self._host_pool)):
                if key in data and not tier.pinned(key):
                    self._remove(tier, data, pool, key)


def _done_now(work: Callable[..., None], *args: object) -> Future:
    """`work(*args)` run now, as a finished future (its exception kept in it, as the thread pool's would be)."""
    future: Future = Future()
    try:
        work(*args)
        future.set_result(None)
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future, as from a pool
        future.set_exception(exc)
    return future
