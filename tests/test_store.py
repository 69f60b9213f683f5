"""The store on the CPU with an in-memory source: budgets hold, pins hold, errors reach the caller."""
import dataclasses
import sys
import threading
import time
from concurrent.futures import wait

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tierstore.policies import PlanInput, UnitInfo, make_plan

from tierstore import BudgetError, CheckpointError
from tierstore.store import BufferPool, TieredStore
from tierstore.transfer import CPUTransfer
from tierstore.units import UnitLayout


class MemorySource:
    """Units whose tensors hold their own index; can be told to fail."""

    def __init__(self, sizes):
        self.layouts = {key: UnitLayout.pack(key, {"w": (torch.float32, (n,))}) for key, n in sizes.items()}
        self.reads: list[str] = []
        self.fail: set[str] = set()
        self.lock = threading.Lock()

    def layout(self, key):
        return self.layouts[key]

    def read_into(self, key, out):
        with self.lock:
            self.reads.append(key)
        if key in self.fail:
            raise CheckpointError(f"units/{key}.bin: checksum mismatch")
        self.layouts[key].views(out)["w"].fill_(float(int(key[1:])))


def make_store(sizes, device, host, **plan_kw):
    source = MemorySource(sizes)
    schedule = tuple(sizes)
    layouts = source.layouts
    plan = make_plan(PlanInput(units=tuple(UnitInfo(k, layouts[k].nbytes) for k in schedule), schedule=schedule,
                               device_budget_bytes=device, host_budget_bytes=host, **plan_kw))
    return TieredStore(source, layouts, plan, CPUTransfer(), reader_threads=2), source


def run_passes(store, passes):
    for _ in range(passes):
        for position, key in enumerate(store.schedule):
            tensors = store.get(key, position)
            assert torch.all(tensors["w"] == float(int(key[1:])))
            store.release(key)


def test_regimes_and_counters():
    sizes = {f"u{i}": 256 for i in range(8)}  # 1 KiB each
    store, source = make_store(sizes, device=4 * 1024, host=5 * 1024)
    run_passes(store, 5)
    stats = store.tier_stats()
    assert stats["device"].peak_bytes <= 4 * 1024 and stats["host"].peak_bytes <= 5 * 1024
    requests = 5 * 8
    assert stats["device"].hits + stats["device"].misses == requests
    assert stats["host"].hits + stats["host"].misses == stats["device"].misses
    # resident units hit every pass after the first; the rest stream
    assert stats["device"].hits >= 4 * len(store.plan.device_resident)
    store.close()


def test_disk_reads_per_pass_are_the_minimum_not_a_full_reread():
    sizes = {f"u{i}": 256 for i in range(10)}
    store, source = make_store(sizes, device=4 * 1024, host=4 * 1024)
    run_passes(store, 1)
    first = len(source.reads)
    run_passes(store, 10)
    per_pass = (len(source.reads) - first) / 10
    assert per_pass <= len(store.plan.streamed_from_disk) + 1
    assert per_pass < 10
    store.close()


def test_unit_larger_than_a_tier_names_its_size():
    with pytest.raises(BudgetError, match="1024 bytes"):
        make_store({"u0": 256, "u1": 256}, device=1000, host=10_000)


def test_read_error_reaches_the_caller_and_is_retried():
    store, source = make_store({f"u{i}": 256 for i in range(4)}, device=2 * 1024, host=2 * 1024)
    source.fail.add("u2")
    with pytest.raises(CheckpointError, match="units/u2.bin"):
        run_passes(store, 1)
    source.fail.clear()
    run_passes(store, 2)
    store.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 2048), min_size=2, max_size=12), st.integers(1, 6), st.integers(1, 8),
       st.sampled_from(["auto", "lru", "fifo", "mru", "lfu", "belady"]), st.integers(0, 3),
       st.lists(st.integers(0, 11), max_size=60))
def test_budgets_never_exceeded(numels, device_units, host_units, policy, depth, trace):
    sizes = {f"u{i}": n for i, n in enumerate(numels)}
    largest = max(UnitLayout.pack("x", {"w": (torch.float32, (n,))}).nbytes for n in numels)
    device, host = device_units * largest, host_units * largest
    store, _ = make_store(sizes, device, host, device_policy=policy, host_policy=policy, prefetch_depth=depth)
    keys = list(sizes)
    for index in trace + list(range(len(keys))) * 2:
        key = keys[index % len(keys)]
        tensors = store.get(key, index % len(keys))
        assert tensors["w"].numel() == sizes[key]
        store.release(key)
        assert store.device.used_bytes <= device and store.host.used_bytes <= host
    store.close()
    for stats, budget in ((store.device.stats, device), (store.host.stats, host)):
        assert stats.peak_bytes <= budget


def test_replan_shrinks_the_device_tier_and_keeps_serving():
    sizes = {f"u{i}": 256 for i in range(8)}
    store, _ = make_store(sizes, device=6 * 1024, host=8 * 1024)
    run_passes(store, 2)
    smaller = make_plan(PlanInput(units=tuple(UnitInfo(k, store.layouts[k].nbytes) for k in sizes),
                                  schedule=tuple(sizes), device_budget_bytes=6 * 1024, host_budget_bytes=8 * 1024,
                                  device_reserve_bytes=3 * 1024))
    store.replan(smaller)
    assert store.device.used_bytes <= smaller.device_weights_bytes
    run_passes(store, 3)
    assert store.device.used_bytes <= smaller.device_weights_bytes
    assert store.device.budget_bytes == smaller.device_weights_bytes
    store.close()


def _layers_and_head(reserve_bytes):
    """Eight 4 KB layers, a resident norm and a 2.6 KB head (a 7B model's proportions), on a 40 KB device with
    `reserve_bytes` kept back (a batch's KV cache)."""
    sizes = {**{f"u{i}": 1012 for i in range(8)}, "u8": 4, "u9": 655}
    store, _ = make_store(sizes, device=40_000, host=80_000, device_reserve_bytes=reserve_bytes)
    return store, sizes


def _copied_bytes_a_pass(store, passes=3):
    """Device bytes copied a pass, each copy queued (its unit unpinned) before the loop goes on, as on a GPU,
    where the loop runs ahead of the copies it queues."""
    def one_pass():
        for position, key in enumerate(store.schedule):
            store.get(key, position)
            store.release(key)
            wait(store._pending_loads())

    one_pass()
    before = store.tier_stats()["device"].bytes_in
    for _ in range(passes):
        one_pass()
    return (store.tier_stats()["device"].bytes_in - before) / passes


def test_replan_to_a_shallower_prefetch_copies_each_streamed_unit_once_a_pass():
    """A larger reserve leaves room for two layers in flight, not three: prefetching as deep as before evicted
    the layer needed next for the one after it, copying every layer twice a pass (a 7B batch of 64 on an H200:
    0.48 s a pass against 0.22)."""
    store, sizes = _layers_and_head(reserve_bytes=10_000)
    assert store.plan.prefetch_depth == 2
    shallower = make_plan(PlanInput(units=tuple(UnitInfo(k, store.layouts[k].nbytes) for k in sizes),
                                    schedule=tuple(sizes), device_budget_bytes=40_000, host_budget_bytes=80_000,
                                    device_reserve_bytes=40_000 - 10_470))
    assert shallower.prefetch_depth == 1 and shallower.device_resident == ("u8",)
    store.replan(shallower)
    streamed = sum(store.layouts[key].nbytes for key in shallower.streamed_from_host)
    assert _copied_bytes_a_pass(store) == streamed
    store.close()


def test_a_prefetch_never_evicts_a_unit_needed_before_it():
    """A plan whose prefetch runs deeper than its room (a depth set by hand) stops at the room: the units nearer
    in the schedule stay."""
    store, _ = _layers_and_head(reserve_bytes=40_000 - 10_470)
    store.replan(dataclasses.replace(store.plan, prefetch_depth=2))
    streamed = sum(store.layouts[key].nbytes for key in store.plan.streamed_from_host)
    assert _copied_bytes_a_pass(store) == streamed
    store.close()


def test_a_prefetch_never_evicts_a_unit_the_plan_keeps_on_the_device():
    """A prefetch deeper than the room beside the resident units waits for room instead of evicting one of them
    (which was then copied again: 66,304 bytes a pass against the 28,672 streamed); the resident units stay at
    their addresses, as the graphs of resident layers need (layer_graphs.py)."""
    store, _ = _layers_and_head(reserve_bytes=20_000)
    assert "u0" in store.plan.device_resident and store.plan.prefetch_depth == 2
    store.replan(dataclasses.replace(store.plan, prefetch_depth=4))
    streamed = sum(store.layouts[key].nbytes for key in store.plan.streamed_from_host)
    addresses = {key: store.get(key)["w"].data_ptr() for key in store.plan.device_resident}
    for key in addresses:
        store.release(key)
    assert _copied_bytes_a_pass(store) == streamed
    assert {key: store.get(key)["w"].data_ptr() for key in addresses} == addresses
    store.close()


def test_disk_reads_run_ahead_of_a_device_tier_with_room_for_one_unit():
    """Device room for one streamed unit means no device prefetch; the disk must still read ahead into the host
    slots, so reads overlap the compute instead of alternating with it."""
    sizes = {f"u{i}": 256 for i in range(8)}
    nbytes = 1024
    store, source = make_store(sizes, device=nbytes, host=3 * nbytes)
    assert store.plan.prefetch_depth == 0 and store.plan.disk_prefetch_depth == 2
    assert store.plan.host_slot_bytes + sum(nbytes for _ in store.plan.host_resident) <= 3 * nbytes
    run_passes(store, 1)
    wait(store._pending_loads())  # the last pass's read-ahead (u0, u1) lands before the count starts
    source.reads.clear()
    store.get("u0", 0)
    deadline = time.monotonic() + 5
    while not source.reads and time.monotonic() < deadline:
        time.sleep(0.01)
    # units further on in the pass are read now, before anyone asks for them (u0 was read ahead last pass)
    assert source.reads and set(source.reads) <= set(store.plan.streamed_from_disk) - {"u0"}, source.reads
    store.release("u0")
    run_passes(store, 3)
    stats = store.tier_stats()
    assert stats["host"].peak_bytes <= 3 * nbytes and stats["device"].peak_bytes <= nbytes
    assert stats["disk"].hits >= 3 * 8 - 1  # read-ahead units still count as served by the disk
    store.close()


class _Interrupt(BaseException):
    pass


def _interrupt_at_line(target_line: int, code: object):
    """A tracer raising `_Interrupt` at the `target_line`-th line event inside `code`, as Ctrl-C would."""
    seen = [0]

    def local(frame, event, arg):
        if event == "line":
            seen[0] += 1
            if seen[0] == target_line:
                raise _Interrupt
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code in code else None
    return tracer


def test_buffer_pool_survives_an_interrupt_at_any_line():
    """Ctrl-C can land between any two steps of taking or giving a buffer; the pool must still close (an empty
    bucket left behind once made `close` fail with IndexError instead of exiting 130)."""
    codes = {BufferPool.take.__code__, BufferPool._pop.__code__, BufferPool.give.__code__, BufferPool.trim.__code__}
    interrupted = 0
    for line in range(1, 40):
        pool = BufferPool(lambda n: torch.empty(n, dtype=torch.uint8))
        pool.give(torch.empty(8, dtype=torch.uint8), None)
        pool.give(torch.empty(8, dtype=torch.uint8), None)
        sys.settrace(_interrupt_at_line(line, codes))
        try:
            pool.take(8, 8, 64)
            pool.take(8, 16, 64)
            pool.give(torch.empty(16, dtype=torch.uint8), None)
        except _Interrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        assert all(pool._free.values()), f"an interrupt at line event {line} left an empty bucket"
        pool.trim(0, 0)
        assert not pool._free
    assert interrupted >= 10  # the interrupts did land inside the pool


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=60))
def test_first_fit_never_overlaps_and_merges_back_to_one_range(steps):
    """The pinned arena's ranges: pieces taken never overlap or leave the capacity, and once every piece is back
    the arena is one free range again (freed neighbours merge), whatever the order."""
    from tierstore.transfer import FirstFit

    capacity = 100
    ranges = FirstFit(capacity)
    taken: list[tuple[int, int]] = []
    for give_back, size in steps:
        if give_back and taken:
            ranges.give(*taken.pop(size % len(taken)))
            continue
        start = ranges.take(size)
        used = {byte for begin, n in taken for byte in range(begin, begin + n)}
        if start is None:  # only when no free run of `size` bytes exists
            assert not any(all(b not in used for b in range(s, s + size)) for s in range(capacity - size + 1))
            continue
        assert 0 <= start and start + size <= capacity and not used & set(range(start, start + size))
        taken.append((start, size))
    assert ranges.free_bytes == capacity - sum(n for _, n in taken)
    for piece in taken:
        ranges.give(*piece)
    assert ranges.take(capacity) == 0


class ArenaTransfer(CPUTransfer):
    """Host buffers carved from an arena, as on a GPU (where it is pinned); counts what does not fit."""

    def __init__(self, capacity_bytes):
        super().__init__()
        from tierstore.transfer import Arena

        self.arena = Arena(capacity_bytes)
        self.outside = 0

    def allocate_host(self, nbytes):
        piece = self.arena.take(nbytes)
        if piece is None:
            self.outside += 1
            return torch.empty(nbytes, dtype=torch.uint8)
        return piece

    def free_host(self, buffer):
        self.arena.give(buffer)


def test_a_large_unit_finds_its_room_in_the_arena_pass_after_pass():
    """A 72B model's shape in small: layers and a five-times larger output layer at the end of the pass, the host
    tier holding it and some layers and staging the rest from disk. Its arena must hold them all, every pass,
    without pinning anything outside (on a GPU that cost 4.3 GB of RSS beyond the RAM budget)."""
    layer = 4 * 4096  # bytes: four pages, as the arena carves whole pages
    sizes = {f"u{i}": layer // 4 for i in range(12)} | {"u99": 5 * layer // 4}
    layouts = MemorySource(sizes).layouts
    host = 5 * layer + 6 * layer
    plan = make_plan(PlanInput(units=tuple(UnitInfo(k, layouts[k].nbytes) for k in sizes), schedule=tuple(sizes),
                               device_budget_bytes=5 * layer, host_budget_bytes=host))
    assert "u99" in plan.host_resident and plan.streamed_from_disk
    transfer = ArenaTransfer(host)
    store = TieredStore(MemorySource(sizes), layouts, plan, transfer, reader_threads=2)
    run_passes(store, 4)
    assert transfer.outside == 0 and store.tier_stats()["host"].peak_bytes <= host
    store.close()


class FencedTransfer(CPUTransfer):
    """Counts compute fences and records the fence each device copy was told to wait for."""

    def __init__(self):
        super().__init__()
        self.fences = 0
        self.waited_for: list[object] = []

    def compute_fence(self):
        self.fences += 1
        return f"compute fence {self.fences}"

    def copy(self, dst, src, dst_free_after):
        self.waited_for.append(dst_free_after)
        return super().copy(dst, src, dst_free_after)


def test_every_device_copy_waits_for_the_compute_queued_before_its_buffer_was_handed_out():
    """A fresh device buffer may be memory the compute stream still reads (freed, not yet run): the copy into it
    waits for a compute fence, as a reused buffer waits for the one of its eviction (on an H200 a copy that did
    not poisoned a tensor-parallel rank's prefill with NaN)."""
    sizes = {f"u{i}": 256 for i in range(8)}
    layouts = MemorySource(sizes).layouts
    plan = make_plan(PlanInput(units=tuple(UnitInfo(k, layouts[k].nbytes) for k in sizes), schedule=tuple(sizes),
                               device_budget_bytes=4 * 1024, host_budget_bytes=8 * 1024))
    transfer = FencedTransfer()
    store = TieredStore(MemorySource(sizes), layouts, plan, transfer, reader_threads=2)
    run_passes(store, 3)
    store.close()
    assert len(transfer.waited_for) > len(sizes)  # streamed units came back pass after pass
    assert all(isinstance(fence, str) and fence.startswith("compute fence") for fence in transfer.waited_for)


def test_a_tiers_evictable_units_are_a_view_of_what_is_held_and_unpinned():
    """The victims' candidates: held and not pinned, as the tier is now (not a copy), minus victims taken."""
    from tierstore.policies.eviction import LRU
    from tierstore.tier import Tier

    tier = Tier("device", 100, LRU())
    for key in ("a", "b", "c"):
        tier.admit(key, 10)
    tier.pin("b")
    view = tier.evictable()
    assert sorted(view) == ["a", "c"] and len(view) == 2 and "b" not in view
    view.discard("a")
    assert sorted(view) == ["c"] and "a" in tier.evictable()
    tier.unpin("b")
    assert "b" in view  # a view: it sees the unpin
    assert tier.plan_admit("d", 90) == ["a", "b"]  # LRU order: 90 of 100 with 30 held needs 20 freed


def test_a_slots_views_are_made_once_and_named_for_the_unit_in_it():
    """Experts placed alike reuse the views of the slot they land in; each unit sees its own names, and views of
    different slots or placements never mix."""
    from tierstore.store import SlotPool

    pool = SlotPool(torch.zeros(4 * 1024, dtype=torch.uint8), 1024)
    first = UnitLayout.pack("e1", {"e1.up": (torch.float32, (8, 4)), "e1.down": (torch.float32, (4, 8))})
    second = UnitLayout.pack("e2", {"e2.up": (torch.float32, (8, 4)), "e2.down": (torch.float32, (4, 8))})
    other = UnitLayout.pack("x", {"x.w": (torch.bfloat16, (16, 16))})
    slot = pool.tensor[2048:3072]
    a, b = pool.views(slot, first), pool.views(slot, second)
    assert list(a) == ["e1.up", "e1.down"] and list(b) == ["e2.up", "e2.down"]
    assert a["e1.up"] is b["e2.up"] and a["e1.down"] is b["e2.down"]  # made once
    assert a["e1.up"].data_ptr() == slot.data_ptr() and a["e1.down"].shape == (4, 8)
    elsewhere = pool.views(pool.tensor[0:1024], first)
    assert elsewhere["e1.up"].data_ptr() == pool.tensor.data_ptr()
    assert pool.views(slot, other)["x.w"].dtype == torch.bfloat16
    assert pool.index(b["e2.down"]) == 2


def test_room_made_at_once_for_several_units_never_takes_one_of_them():
    """Loads asked for together find their room in one walk of the policy, and that walk never evicts a unit of
    the same request that is already there (it is needed before the later ones)."""
    store, _ = make_store({f"u{i}": 64 for i in range(6)}, device=4 * 256, host=6 * 256, device_policy="lru")
    for key in ("u0", "u1", "u2", "u3"):
        store.get(key)
        store.release(key)
    started = store.prefetch(["u0", "u4", "u5"])  # u0 is the least recently used, and asked for first
    assert started == ["u4", "u5"]
    assert store.on_device("u0") and not store.on_device("u1") and not store.on_device("u2")
    store.close()
