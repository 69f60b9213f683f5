"""Routed experts fetched as the router picks them, computed by transformers' own experts kernel.

Each expert is a unit of the experts' store, whose device tier is a set of equal slots carved from one tensor.
Seen as stacked slots, that tensor is a fused experts parameter of `slots` experts: an MoE layer runs its experts
module unchanged on it, with the routed expert ids mapped to the slots that hold them. So only the routed experts
cross the link, the kernel is transformers' (grouped_mm by default), and nothing is copied on the device.

Per layer: one device->host sync reads the routing (and the next layer's predicted experts). Routed experts in
slots cost nothing; each missed one is either copied into a slot or computed by the CPU from host RAM
(host_experts.py), as `experts.compute` and the cost model (policies/experts.py, `split_misses`) say, so that the
link and the CPU work at once. The kernel is queued on the slots, with the host-computed experts' routing weights
masked to zero, the CPU computes its experts meanwhile, and the sum of both is the layer's output; the predicted
experts start copying behind the kernel (behind the CPU's experts when it has some: loads in flight hold host RAM
those may need). Slots beyond what the kernel takes in one call (MAX_GROUPS) are run in
windows of that many, one call per window the routing touches.

In a verify pass of speculative decoding, the drafted tree is first pruned to the pass's expert budget
(expert_budget.py): nodes whose experts would take the layer's missed experts past its cap, or that are not worth
the experts they add, are dropped and need no expert (`_within_budget`); without a cap the next layer's experts
are still predicted, for the kept nodes only. While the host waits for a layer's routing (the previous layer's
copies landing), it may do other work handed in for the pass (`while_routing`: a draft growing its next tree).

A decode step's layer call (a few tokens) can instead read its experts in place, from their slot or from mapped
host RAM, with no sync and no copy (mapped_experts.py): under `experts.compute = mapped`, and under auto on a GPU
whose pinned host RAM holds every expert.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...compression import Codec, PackedMatrices
from ...errors import ConfigError
from ...policies.experts import ExpertCosts, ExpertPlan, best_policy, split_misses
from ...policies.registry import make_eviction
from ...store import SlotPool, StoreEvent, TieredStore
from ...transfer import CPUTransfer, CUDATransfer
from ...units import TensorSlot, UnitLayout, UnitSource
from ..loading.skeleton import ExpertGroup, expert_slice
from .expert_budget import ExpertBudget
from .hooks import PACKED_MATVEC_TOKENS
from .host_experts import computes_on_host, cpu_threads, host_outputs, host_threads
from .mapped_experts import MAX_PAIRS, MappedExperts, Served
from .packed_experts import ExpertUnpacker, stored_alike

PRUNED = -1  # the routing of a tree node an expert budget dropped: no expert

MAX_GROUPS = 1023  # torch's grouped_mm takes fewer than 1024 groups on a GPU; the slots are the kernel's groups


def open_experts(groups: Sequence[ExpertGroup], source: UnitSource, layouts: Mapping[str, UnitLayout],
                 plan: ExpertPlan, dense: TieredStore, transfer: CPUTransfer | CUDATransfer, reader_threads: int,
                 on_event: Callable[[StoreEvent], None] | None = None, packed: Packed | None = None) -> ExpertRunner:
    """The experts' store over the expert units' `layouts` (device slots, host RAM, disk, as `plan` says) and
    the runner using it. `packed`: compressed experts' codec, where each one's matrices sit, and the compute
    dtype they are dequantized into (packed_experts.py)."""
    pool = SlotPool(transfer.allocate_device(plan.device_slots * plan.expert_bytes), plan.expert_bytes)
    keys = [key for group in groups for key in group.keys]
    store = TieredStore(source, dict(layouts), plan.store_plan(keys), transfer, reader_threads=reader_threads,
                        on_event=on_event, device_pool=pool, copy_inline=True)
    unpacker = None
    if packed is not None:
        first = groups[0].keys[0]
        unpacker = ExpertUnpacker(packed.codec, packed.matrices[first], layouts[first], _names(groups[0], 0),
                                  plan.window, packed.dtype, pool.tensor.device,
                                  alike=stored_alike(packed.codec, packed.matrices, keys))
    return ExpertRunner(groups, store, pool, dense, plan.prefetch, plan.device_policy if plan.choose_policy else None,
                        plan.compute, plan.costs, unpacker, packed.matrices if packed is not None else None)


@dataclasses.dataclass(frozen=True)
class Packed:
    """Compressed experts: their codec, each expert unit's matrices (key -> where they sit), the compute dtype."""

    codec: Codec
    matrices: Mapping[str, PackedMatrices]
    dtype: torch.dtype


def _names(group: ExpertGroup, expert: int) -> list[str]:
    """Expert `expert`'s tensor names in `group`, in the kernel's parameter order."""
    return [expert_slice(tensor, expert) for _, tensor in group.attrs]


def stacked_views(pool: SlotPool, layout: UnitLayout) -> list[torch.Tensor]:
    """For each tensor of an expert's layout, in order, the view of all slots as one (slots, *shape) tensor."""
    return [_stacked(pool, slot) for slot in layout.slots.values()]


def _stacked(pool: SlotPool, slot: TensorSlot) -> torch.Tensor:
    itemsize = slot.dtype.itemsize
    typed = pool.tensor.view(slot.dtype)
    inner = torch.empty(slot.shape, device="meta").stride()
    return typed.as_strided((pool.count, *slot.shape), (pool.slot_bytes // itemsize, *inner),
                            typed.storage_offset() + slot.offset // itemsize)


@dataclasses.dataclass
class ExpertStats:
    """Routing counters of the last generate call: per MoE layer call, the experts routed to (distinct), the
    (token, expert) pairs, and of the predicted experts how many were routed to."""

    calls: int = 0
    routed: int = 0
    pairs: int = 0
    predicted: int = 0
    predicted_hits: int = 0
    predicted_routed: int = 0  # routed experts of the layers that had a prediction
    prefetch_copied: int = 0  # experts copied because they were predicted
    prefetch_used: int = 0  # of those, routed to by the layer they were copied for
    chunked_calls: int = 0
    host_computed: int = 0  # missed experts the CPU computed instead of copying
    host_bytes: int = 0  # their weight bytes, read by the CPU
    host_s: float = 0.0  # the CPU's time computing them
    host_unpack_s: float = 0.0  # of which dequantizing them (compressed experts)
    host_pairs: int = 0  # (token, expert) pairs of those: pairs / experts is the tokens an expert the CPU got
    host_calls: int = 0  # layer calls in which the CPU computed some
    mapped_pairs: int = 0  # (token, expert) pairs whose expert the device read in place (mapped_experts.py)
    mapped_from_slots: int = 0  # of those, read from a slot; the others over the link from host RAM
    mapped_bytes: int = 0  # the expert bytes those others read over the link
    mapped_admitted: int = 0  # experts read in place that were then copied into a slot (routed to again and again)
    layer_s: float = 0.0  # wall time in MoE layers' experts (the loop's thread)
    sync_s: float = 0.0  # of which waiting for the routing to reach the host (less the work below)
    meanwhile_s: float = 0.0  # of which the work handed in for that wait (`while_routing`: a draft's steps)
    counts: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)  # (layer, expert) -> pairs

    def to_dict(self, layers: int, experts_per_layer: int) -> dict[str, Any]:
        """Counters plus the routing distribution: the share of (token, expert) pairs the busiest tenth of experts
        took (0.1 when routing is uniform)."""
        loads = sorted(self.counts.values(), reverse=True)
        top = max(1, (layers * experts_per_layer) // 10)
        return {"calls": self.calls, "routed": self.routed, "pairs": self.pairs, "chunked_calls": self.chunked_calls,
                "experts_touched": len(self.counts),
                "busiest_tenth_share": sum(loads[:top]) / self.pairs if self.pairs else None,
                "prediction_recall": (self.predicted_hits / self.predicted_routed if self.predicted_routed
                                      else None),
                "predicted": self.predicted, "predicted_hits": self.predicted_hits,
                "prefetch_copied": self.prefetch_copied,
                "prefetch_used_share": self.prefetch_used / self.prefetch_copied if self.prefetch_copied else None,
                "host_computed": self.host_computed, "host_bytes": self.host_bytes, "host_s": self.host_s,
                "host_unpack_s": self.host_unpack_s,
                "cpu_gbps": self.host_bytes / self.host_s / 1e9 if self.host_s else None,
                "host_pairs": self.host_pairs, "host_calls": self.host_calls,
                "host_tokens_per_expert": self.host_pairs / self.host_computed if self.host_computed else None,
                "host_experts_per_call": self.host_computed / self.host_calls if self.host_calls else None,
                "mapped_pairs": self.mapped_pairs, "mapped_bytes": self.mapped_bytes,
                "mapped_admitted": self.mapped_admitted,
                "mapped_slot_share": self.mapped_from_slots / self.mapped_pairs if self.mapped_pairs else None,
                "meanwhile_s": self.meanwhile_s,
                "host_work_s_per_call": ((self.layer_s - self.sync_s - self.meanwhile_s - self.host_s) / self.calls
                                         if self.calls else None)}


class ExpertRunner:
    """Runs each MoE layer's experts module on the routed experts only (see the module docstring): a module
    adapter (adapters.py), attached when made."""

    MAX_ACCESSES = 200_000  # routed experts kept per call to choose the eviction policy from

    def __init__(self, groups: Sequence[ExpertGroup], store: TieredStore, pool: SlotPool, dense: TieredStore,
                 prefetch: str, adaptive_policy: str | None = None, compute: str = "device",
                 costs: ExpertCosts | None = None, unpacker: ExpertUnpacker | None = None,
                 packed: Mapping[str, PackedMatrices] | None = None) -> None:
        """`adaptive_policy`: the device slots' policy now, re-chosen after each call (`end_call`); None keeps
        the planned one. `compute`: where missed experts run (device, host, or auto: split by `costs`).
        `unpacker`: for compressed experts (`packed`: where each one's matrices sit), the window they are
        dequantized into before the kernel runs."""
        self.groups = tuple(groups)
        self.store = store
        self.pool = pool
        self.dense = dense
        self.stats = ExpertStats()
        self._unpacker = unpacker
        self._packed = packed or {}
        self._pool_rows = pool.tensor[:pool.count * pool.slot_bytes].view(pool.count, pool.slot_bytes)
        self._windows = [(start, min(start + MAX_GROUPS, pool.count)) for start in range(0, pool.count, MAX_GROUPS)]
        self._window_views = ([] if unpacker is not None else
                              [[view[start:end] for view in stacked_views(pool, store.layouts[self.groups[0].keys[0]])]
                               for start, end in self._windows])
        self.compute = compute
        self.costs = costs
        self._expert_bytes = store.layouts[self.groups[0].keys[0]].nbytes
        # what the CPU's work on one expert scales with: its matrices as they compute (dequantized first)
        self._host_work_bytes = (sum(view[0].nbytes for view in unpacker.views) if unpacker is not None
                                 else self._expert_bytes)
        self._on_host_ok = [computes_on_host(group.module) for group in self.groups]
        self._originals = [{attr: group.module._parameters[attr] for attr, _ in group.attrs} for group in groups]
        self._next = [groups[i + 1] if prefetch != "none" and i + 1 < len(groups) and groups[i + 1].router else None
                      for i in range(len(groups))]
        self._gate = PrefetchGate(prefetch)
        self._device = pool.tensor.device
        self._expected: dict[int, list[int]] = {}  # layer index -> experts predicted for it, this pass
        self._copied: dict[int, list[str]] = {}  # layer index -> expert units copied on that prediction
        self.policy = adaptive_policy
        self._accesses: list[str] = []  # this call's routed experts, in order
        self._mapped: MappedExperts | None = None  # made on the first call that reads experts in place
        self._keys = [key for group in self.groups for key in group.keys]
        # auto reads a decode step's experts in place where the device can: a GPU, every expert in pinned RAM,
        # compressed experts all in one format (each read is dequantized on the device, as `mapped` does)
        pinned = getattr(store.transfer, "pinned", False)
        self._maps_on_auto = (self._device.type == "cuda" and pinned and (unpacker is None or unpacker.alike)
                              and len(store.plan.host_resident) == len(store.layouts))
        if compute == "mapped" and unpacker is not None and not unpacker.alike:
            raise ConfigError("experts.compute = mapped dequantizes the experts it reads all alike; these are stored "
                              "in several formats, or rotated: choose auto, device or host")
        if compute == "mapped" and self._device.type == "cuda" and not pinned:
            raise ConfigError("experts.compute = mapped reads experts from page-locked host RAM; set "
                              "io.pinned_memory = true, or choose device or host")
        self._mapped_stale = False  # the slots may have changed since its table was made
        self._in_ram = False  # every expert has been read into host RAM
        self.budget: ExpertBudget | None = None  # a verify pass's, during its forward (`pruning`)
        self._meanwhile: Callable[[], None] | None = None  # the host's work while routing is awaited (while_routing)
        for index, group in enumerate(self.groups):
            group.module.forward = functools.partial(self._forward, index)

    @property
    def unpacked_window_bytes(self) -> int:
        """Device bytes of the window compressed experts are dequantized into (0 for uncompressed experts)."""
        return self._unpacker.nbytes if self._unpacker is not None else 0

    def reset(self) -> None:
        """Start the counters afresh (a new generate call), the store's too."""
        self.stats = ExpertStats()
        self.store.reset_counters()
        self._accesses = []
        if self._mapped is not None:  # a call that ended without end_call (an error): not this call's
            self._mapped.drain(wait=True)
            self._mapped.replays_done()

    def end_call(self) -> list[str]:
        """After a generate call: under an adaptive policy, replay the call's routing through the device slots
        under each policy and keep the one that would have hit most for the next call. Returns report notes."""
        if self._mapped is not None:
            self._count_served(self._mapped.drain(wait=True) + self._mapped.replays_done())
        if self.policy is None or not self._accesses:
            return []
        best, rates = best_policy(self._accesses, self.pool.count, self.policy)
        if best != self.policy:
            self.store.replace_device_policy(make_eviction(best, (), set()))
            self.policy = best
        replayed = ", ".join(f"{name} {rate:.1%}" for name, rate in rates.items())
        return [f"expert slots' policy for the next call: {best} (this call's routing replayed: {replayed})"]

    def missed_expert_s(self) -> float | None:
        """What one missed expert costs a layer call, as measured: its copy over the link, or under `host` the
        CPU's work on it for one token; None where the rates are not known."""
        if self.costs is None:
            return None
        if self.compute == "host":
            return self.costs.host_s(self._host_work_bytes, 1)
        return self.costs.copy_s(self._expert_bytes)

    @contextlib.contextmanager
    def pruning(self, budget: ExpertBudget) -> Iterator[ExpertBudget]:
        """Within: MoE layer calls prune `budget`'s tree to it (a verify pass's forward)."""
        self.budget = budget
        try:
            yield budget
        finally:
            self.budget = None

    @contextlib.contextmanager
    def while_routing(self, work: Callable[[], None]) -> Iterator[None]:
        """Within: each layer call runs `work()` once its routing's kernels are queued, before the host reads the
        routing back (which waits for everything queued before it: the previous layer's copies and kernels); the
        work is given that wait, and should return once the device has caught up (a draft's steps: a verify
        pass's `meanwhile`)."""
        self._meanwhile = work
        try:
            yield
        finally:
            self._meanwhile = None

    def detach(self) -> None:
        """Give every experts module back its own forward, parameters and expert count (the store is closed by
        whoever opened it)."""
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
        for group, originals in zip(self.groups, self._originals):
            group.module.__dict__.pop("forward", None)
            group.module._parameters.update(originals)
            group.module.num_experts = group.num_experts

    # -- one MoE layer --------------------------------------------------------------------------------------
    def _forward(self, index: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        start_s = time.perf_counter()
        if self._reads_in_place(index, top_k_index):
            if self._device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # see before_replay
                return self._mapped.forward(index, hidden, top_k_index, top_k_weights)  # type: ignore[union-attr]
            output = self._read_in_place(index, hidden, top_k_index, top_k_weights)
            self.stats.layer_s += time.perf_counter() - start_s
            return output
        self._mapped_stale = self._mapped is not None  # this call may change what the slots hold
        # no prediction under a cap of missed experts: the pass moves only the experts its kept nodes need
        capped = self.budget is not None and self.budget.max_missed is not None
        predicts = not capped and self._next[index] is not None and self._gate.wanted()
        following = self._next[index] if predicts else None
        meanwhile_s = self.stats.meanwhile_s
        routed, guesses = self._routing(hidden, top_k_index, following)
        self.stats.sync_s += time.perf_counter() - start_s - (self.stats.meanwhile_s - meanwhile_s)
        top_k = top_k_index.shape[-1]
        if self.budget is not None and len(routed) == top_k * len(self.budget.live):
            routed, top_k_index, top_k_weights = self._within_budget(index, routed, top_k, top_k_index, top_k_weights)
        predicted = _guessed(guesses, routed, top_k)
        pairs = Counter(routed)  # a verify pass routes thousands of (token, expert) pairs a layer: counted in C, once
        self._count(index, pairs, predicted)
        chunks = _token_chunks([routed[i:i + top_k] for i in range(0, len(routed), top_k)], self.pool.count)
        if len(chunks) > 1:
            self.stats.chunked_calls += 1
        outputs = []
        for first, (start, end, experts) in enumerate(chunks):
            if not experts:  # only nodes an expert budget pruned
                outputs.append(torch.zeros_like(hidden[start:end]))
                continue
            prefetch = [following.keys[e] for e in predicted] if first == 0 and following else []
            chunk = routed[start * top_k:end * top_k]
            outputs.append(self._run(index, experts, chunk, pairs if len(chunks) == 1 else Counter(chunk), prefetch,
                                     hidden[start:end], top_k_index[start:end], top_k_weights[start:end], args,
                                     kwargs))
        self.stats.layer_s += time.perf_counter() - start_s
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _reads_in_place(self, index: int, top_k_index: torch.Tensor) -> bool:
        """Whether this layer call reads its experts in place: asked for (or auto where the device can), a
        decode step's few tokens, and experts whose math the gather's matmuls run."""
        return self._maps() and top_k_index.numel() <= MAX_PAIRS and self._on_host_ok[index]

    def _wants_mapped(self) -> bool:
        return self.compute == "mapped" or (self.compute == "auto" and self._maps_on_auto)

    def _maps(self) -> bool:
        """Whether decode steps read experts in place: asked for, or auto where the device can once every
        expert has reached RAM (until then an eager step copies them, rather than wait for the last read)."""
        return self._wants_mapped() and (self.compute == "mapped" or self._mapped is not None or self._all_in_ram())

    def graphable(self, rows: int) -> bool:
        """Whether a decode step of `rows` sequences leaves its MoE layers nothing to do on the host (every one
        reads its experts in place), so that it can be captured as a CUDA graph (see `before_replay`). A call
        that can be waits here for every expert to reach RAM."""
        if not (self._wants_mapped() and rows * self.groups[0].top_k <= MAX_PAIRS and all(self._on_host_ok)):
            return False
        self._engine()
        return True

    def before_replay(self) -> None:
        """Before each replay of a captured decode step: count the routing the last replay logged, let the slots
        follow it, and re-point the table after calls that went through the store."""
        if self._mapped is not None:
            engine = self._engine()
            self._follow(engine.drain() + engine.replaying())

    def _read_in_place(self, index: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
        """The layer's routed experts read by the device from their slot or from host RAM (mapped_experts.py)."""
        engine = self._engine()
        self._follow(engine.drain())
        return engine.forward(index, hidden, top_k_index, top_k_weights)

    def _engine(self) -> MappedExperts:
        """The in-place reader, made on first use (it waits for every expert to reach RAM), its table re-pointed
        when calls through the store may have changed what the slots hold."""
        if self._mapped is None:
            self._mapped = MappedExperts(self.groups, self.store, self.pool, self._unpacker)
        elif self._mapped_stale:
            self._mapped.refresh()
        self._mapped_stale = False
        return self._mapped

    def _follow(self, served: list[Served]) -> None:
        """Count layer calls read in place and let the slots follow their routing (MappedExperts.admit)."""
        self._count_served(served)
        admitted = self._mapped.admitted  # type: ignore[union-attr]
        self._mapped.admit(served, self.stats.counts)  # type: ignore[union-attr]
        self.stats.mapped_admitted += self._mapped.admitted - admitted  # type: ignore[union-attr]

    def _count_served(self, served: list[Served]) -> None:
        """Count layer calls read in place, once their routing has reached the host."""
        for call in served:
            self._count(call.layer, Counter(call.routed), [])
            over_link = len(call.routed) - call.from_slots
            self.stats.mapped_pairs += len(call.routed)
            self.stats.mapped_from_slots += call.from_slots
            self.stats.mapped_bytes += over_link * self._expert_bytes
            keys = self.groups[call.layer].keys
            self.store.count_served([keys[expert] for expert in call.routed], call.from_slots,
                                    over_link * self._expert_bytes)

    def _routing(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 following: ExpertGroup | None) -> tuple[list[int], list[int]]:
        """The routed expert ids and the next layer's guessed ones (both token-major), read with one sync."""
        ids = top_k_index.reshape(-1)
        if following is None:
            self._while_waiting()
            return ids.tolist(), []
        weight = self.dense.get(following.router)[following.router_tensor]
        try:
            logits = nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), weight)
            guess = logits.topk(following.top_k, dim=-1).indices.reshape(-1)
            queued = torch.cat([ids, guess.to(ids.dtype)])
            self._while_waiting()
            both = queued.tolist()
        finally:
            self.dense.release(following.router)
        return both[:ids.numel()], both[ids.numel():]

    def _while_waiting(self) -> None:
        """The work handed in for this pass (`while_routing`), if any, timed apart from the routing's sync."""
        if self._meanwhile is not None:
            start_s = time.perf_counter()
            self._meanwhile()
            self.stats.meanwhile_s += time.perf_counter() - start_s

    def _within_budget(self, index: int, routed: list[int], top_k: int, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """A verify pass's routing with the nodes its expert budget drops (`self.budget`, one row per tree node)
        taken out: their experts are PRUNED in `routed` (no expert, nothing for the CPU) and the root's in the device
        kernel's index, with routing weight zero (nothing added to their rows, which nobody reads)."""
        keys = self.groups[index].keys
        rows = [routed[start:start + top_k] for start in range(0, len(routed), top_k)]
        live = self.budget.prune(rows, lambda expert: not self.store.on_device(keys[expert]),  # type: ignore[union-attr]
                                 layers_left=len(self.groups) - index)
        if all(live):
            return routed, top_k_index, top_k_weights
        routed = [expert for row, kept in zip(rows, live) for expert in (row if kept else [PRUNED] * top_k)]
        keep = torch.tensor(live, device=top_k_index.device)[:, None]
        return (routed, torch.where(keep, top_k_index, top_k_index[:1]),
                top_k_weights * keep.to(top_k_weights.dtype))

    def _run(self, index: int, experts: list[int], routed: list[int], pairs: Counter, prefetch: list[str],
             hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, args: tuple,
             kwargs: dict) -> torch.Tensor:
        """The layer's experts for these tokens (`routed`: their routing, token-major; `pairs`: its tokens per
        expert): those on the device (or copied there) by the kernel on the slots, the others by the CPU meanwhile;
        then start `prefetch`."""
        group = self.groups[index]
        on_host = self._host_share(index, experts, pairs)
        on_device = [expert for expert in experts if expert not in on_host]
        device_keys = [group.keys[e] for e in on_device]
        self.store.prefetch(device_keys)  # every copy queued before the first wait
        # the CPU's inputs are read now, while nothing is queued after the routing: this waits for nothing
        host_inputs = (hidden.to("cpu"), top_k_weights.to("cpu")) if on_host else None
        held = self.store.get_many(device_keys)
        try:
            output = (self._on_device(index, on_device, held, bool(on_host), hidden, top_k_index, top_k_weights,
                                      args, kwargs) if on_device else None)
            # queued once this layer's kernels are, so that they copy while those compute; before the CPU's work
            # where every expert is in RAM (else after it: loads in flight hold host RAM its experts may need)
            prefetch_first = bool(prefetch) and (host_inputs is None or self._all_in_ram())
            if prefetch_first:
                self._copied[index + 1] = self.store.prefetch(prefetch)
        finally:
            self.store.release_many(device_keys)
        if host_inputs is None:
            return output  # type: ignore[return-value]  (every routed expert ran on the device)
        host = self._on_host(index, sorted(on_host), routed, pairs, top_k_index.shape[-1], *host_inputs)
        if prefetch and not prefetch_first:
            self._copied[index + 1] = self.store.prefetch(prefetch)
        return host.to(hidden.dtype) if output is None else (output.float() + host).to(output.dtype)

    def _host_share(self, index: int, experts: list[int], pairs: Counter) -> set[int]:
        """Which of `experts` the CPU computes: none under "device"; the missed ones (not in a slot, nor on
        their way to one) under "host"; under "auto", of those, what `split_misses` gives the host."""
        if self.compute == "device" or not self._on_host_ok[index]:
            return set()
        keys = self.groups[index].keys
        missed = [expert for expert in experts if not self.store.on_device(keys[expert])]
        if self.compute == "host":
            return set(missed)
        if not missed or self.costs is None:
            return set()
        tokens = {expert: pairs[expert] for expert in missed}
        heat = {expert: self.stats.counts.get((index, expert), 0) for expert in missed}
        return set(split_misses(tokens, self._expert_bytes, self.costs, heat, self._host_work_bytes))

    def _all_in_ram(self) -> bool:
        """Whether every expert has been read into host RAM (once true, it stays: nothing is read from disk)."""
        self._in_ram = self._in_ram or self.store.in_host(self._keys)
        return self._in_ram

    def _on_device(self, index: int, experts: list[int], held: list[dict[str, torch.Tensor]], masked: bool,
                   hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, args: tuple,
                   kwargs: dict) -> torch.Tensor:
        """transformers' experts kernel over `experts` (`held`: their tensors on the device), one call per window
        of them (`_kernel_windows`). A token's other experts (computed on the host, or in another window) point
        at a place in this window with routing weight zero, so that any kernel skips their contribution."""
        group = self.groups[index]
        module = group.module
        if self._in_blocks(index, hidden):
            output = self._on_device_in_blocks(index, experts, held, hidden, top_k_index, top_k_weights)
            if output is not None:
                return output
        outputs = []
        try:
            windows, several = self._kernel_windows(index, experts, held)
            masked = masked or several
            for inside, views in windows:
                table = self._expert_table(group.num_experts, inside)  # expert id -> place in the window
                weights = top_k_weights * table[1][top_k_index].to(top_k_weights.dtype) if masked else top_k_weights
                for (attr, _), view in zip(group.attrs, views):
                    module._parameters[attr] = view
                module.num_experts = views[0].shape[0]
                outputs.append(type(module).forward(module, hidden, table[0][top_k_index], weights, *args, **kwargs))
        finally:
            module._parameters.update(self._originals[index])
            module.num_experts = group.num_experts
        if len(outputs) == 1:
            return outputs[0]
        return torch.stack(outputs).float().sum(0).to(outputs[0].dtype)

    def _in_blocks(self, index: int, hidden: torch.Tensor) -> bool:
        """Whether this call's experts are multiplied in their blocks (packed_experts.py): a decode step's few
        tokens, experts whose formats have a matrix-vector kernel here, the experts math `expert_math` runs."""
        return (self._unpacker is not None and self._unpacker.in_blocks and self._on_host_ok[index]
                and not self.groups[index].module.is_transposed and hidden.shape[0] <= PACKED_MATVEC_TOKENS)

    def _on_device_in_blocks(self, index: int, experts: list[int], held: list[dict[str, torch.Tensor]],
                             hidden: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor | None:
        """`experts` (`held`: their tensors in device slots) on each (token, expert) pair of the routing, their
        matrices multiplied in their blocks; a pair whose expert is not among them (the CPU's, or pruned) runs
        the first one's with weight zero, so that the launch shapes and the host's work do not depend on the
        routing. None where a kernel failed (the caller fills the window)."""
        group = self.groups[index]
        table = self._expert_table(group.num_experts, list(zip(experts, self._slots(held))))  # expert id -> slot
        routed = top_k_index.reshape(-1)
        top_k = top_k_index.shape[-1]
        out = self._unpacker.forward_in_blocks(group.module, [attr for attr, _ in group.attrs],
                                               self._pool_rows.view(-1), table[0][routed], self._pool_rows.shape[1],
                                               hidden.repeat_interleave(top_k, 0))
        if out is None:
            return None
        weights = (top_k_weights.reshape(-1) * table[1][routed].to(top_k_weights.dtype)).float()
        return (out.float() * weights[:, None]).view(hidden.shape[0], top_k, -1).sum(1).to(hidden.dtype)

    def _expert_table(self, num_experts: int, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """[2, num_experts] on the device: row 0 each of `pairs`' (expert, value) experts' value (any other expert
        the first's), row 1 whether the expert is among them. Made pinned, so that its copy queues behind the
        compute."""
        table = torch.zeros((2, num_experts), dtype=torch.long, pin_memory=self._device.type == "cuda")
        table[0] = pairs[0][1]
        ids = torch.tensor([expert for expert, _ in pairs])
        table[0, ids] = torch.tensor([value for _, value in pairs])
        table[1, ids] = 1
        return table.to(self._device, non_blocking=True)

    def _slots(self, held: Sequence[Mapping[str, torch.Tensor]]) -> list[int]:
        """The device slot of each expert of `held` (its tensors there)."""
        return [self.pool.index(next(iter(tensors.values()))) for tensors in held]

    def _kernel_windows(self, index: int, experts: list[int], held: list[dict[str, torch.Tensor]],
                        ) -> tuple[Iterator[tuple[list[tuple[int, int]], list[torch.Tensor]]], bool]:
        """The kernel calls `experts` take, each as (expert, place) pairs and the stacked views the places index,
        and whether there are several. Uncompressed: the slots themselves, in windows of MAX_GROUPS. Compressed:
        the unpacker's window, each call's experts dequantized into it as the call comes (the next fill is
        queued after the kernel that read the last)."""
        if self._unpacker is None:
            slots = self._slots(held)
            windows = sorted({slot // MAX_GROUPS for slot in slots})

            def in_slots() -> Iterator[tuple[list[tuple[int, int]], list[torch.Tensor]]]:
                for window in windows:
                    first, end = self._windows[window]
                    yield ([(expert, slot - first) for expert, slot in zip(experts, slots) if first <= slot < end],
                           self._window_views[window])
            return in_slots(), len(windows) > 1
        unpacker, group = self._unpacker, self.groups[index]

        def unpacked() -> Iterator[tuple[list[tuple[int, int]], list[torch.Tensor]]]:
            for start in range(0, len(experts), unpacker.window):
                chunk = experts[start:start + unpacker.window]
                chunk_held = held[start:start + unpacker.window]
                if unpacker.alike:  # a few kernels for the whole chunk, gathered from the slots
                    slots = torch.tensor(self._slots(chunk_held), pin_memory=self._device.type == "cuda")
                    unpacker.fill_slots(self._pool_rows, slots.to(self._device, non_blocking=True))
                else:
                    for place, (expert, tensors) in enumerate(zip(chunk, chunk_held)):
                        unpacker.fill(place, _names(group, expert), self._packed[group.keys[expert]], tensors)
                yield list(zip(chunk, range(len(chunk)))), unpacker.views
        return unpacked(), len(experts) > unpacker.window

    def _on_host(self, index: int, experts: list[int], routed: list[int], pairs: Counter, top_k: int,
                 hidden: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """The CPU's part of the layer's output (float32, on the device): `experts` from their host RAM copies."""
        group = self.groups[index]
        keys = [group.keys[e] for e in experts]
        tensors = self.store.get_host_many(keys)
        start_s = time.perf_counter()
        unpack_s = 0.0
        try:
            with cpu_threads(host_threads(self._device, torch.get_num_threads())):  # cores kept for GPU waits
                if self._unpacker is not None:  # dequantized by the CPU first
                    tensors = [self._unpacker.on_host(_names(group, e), self._packed[group.keys[e]], unit)
                               for e, unit in zip(experts, tensors)]
                    unpack_s = time.perf_counter() - start_s
                weights = [{attr: tensor for (attr, _), tensor in zip(group.attrs, _values(unit))}
                           for unit in tensors]
                total = host_outputs(group.module, experts, weights, routed, top_k, hidden, routing_weights,
                                     pin_memory=self._device.type == "cuda")
        finally:
            self.store.release_host_many(keys)
        elapsed_s = time.perf_counter() - start_s
        tokens = [pairs[expert] for expert in experts]
        if self.costs is not None and elapsed_s > unpack_s:  # the CPU's rates as this run gets them
            predicted_s = sum(self.costs.host_linear_s(self._host_work_bytes, count) for count in tokens)
            self.costs = self.costs.observed(predicted_s, elapsed_s - unpack_s)
            if unpack_s:
                self.costs = self.costs.unpacked(unpack_s / len(experts))
        self.stats.host_s += elapsed_s
        self.stats.host_unpack_s += unpack_s
        self.stats.host_pairs += sum(tokens)
        self.stats.host_calls += 1
        self.stats.host_computed += len(experts)
        self.stats.host_bytes += len(experts) * self._expert_bytes
        return total.to(self._device, non_blocking=True)

    def _count(self, index: int, pairs: Counter, predicted: list[int]) -> None:
        """Routing counters from the layer call's tokens per expert; how the prediction made for this layer (and
        the copies it started) fared."""
        stats = self.stats
        if PRUNED in pairs:
            pairs = Counter({expert: count for expert, count in pairs.items() if expert != PRUNED})
        distinct = pairs.keys()
        stats.calls += 1
        stats.routed += len(pairs)
        stats.pairs += sum(pairs.values())
        for expert, count in pairs.items():
            stats.counts[index, expert] = stats.counts.get((index, expert), 0) + count
        if self.policy is not None and len(self._accesses) < self.MAX_ACCESSES:
            keys = self.groups[index].keys
            self._accesses.extend(keys[expert] for expert in pairs)  # first-routed order
        expected = self._expected.pop(index, None)
        if expected is not None:
            stats.predicted_hits += len(distinct & set(expected))
            stats.predicted_routed += len(distinct)
        copied = self._copied.pop(index, None)
        if copied:
            keys, copied_keys = self.groups[index].keys, set(copied)
            used = sum(1 for expert in distinct if keys[expert] in copied_keys)
            stats.prefetch_copied += len(copied)
            stats.prefetch_used += used
            self._gate.observe(len(copied), used)
        if predicted:
            stats.predicted += len(predicted)
            self._expected[index + 1] = predicted


def _guessed(guesses: list[int], routed: list[int], top_k: int) -> list[int]:
    """The next layer's experts guessed for the rows an expert budget kept (a pruned row's routing is PRUNED),
    sorted; `guesses` token-major, as many a row as the next layer routes."""
    if not guesses:
        return []
    rows = len(routed) // top_k
    if PRUNED not in routed:
        return sorted(set(guesses))
    per_row = len(guesses) // rows
    return sorted({expert for row in range(rows) if routed[row * top_k] != PRUNED
                   for expert in guesses[row * per_row:(row + 1) * per_row]})


def _values(unit: Mapping[str, torch.Tensor] | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(unit.values()) if isinstance(unit, Mapping) else unit


class PrefetchGate:
    """Whether to predict the next layer's experts: always ("router"), never ("none"), or ("auto") while the
    copies it starts are used at least half the time. A copy that is not used costs the link what a demand miss
    would, and delays the misses queued behind it; on a model whose hot experts are already cached, most of the
    correct guesses cost nothing and the wrong ones are all that is copied. Under "auto" it guesses again now and
    then, to notice when that changes."""

    PROBE_EVERY = 32  # layer calls between guesses while off

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.precision = 1.0  # smoothed share of prefetched copies that were used
        self._calls = 0

    def wanted(self) -> bool:
        if self.mode != "auto":
            return self.mode == "router"
        self._calls += 1
        return self.precision >= 0.5 or self._calls % self.PROBE_EVERY == 0

    def observe(self, copied: int, used: int) -> None:
        self.precision = 0.8 * self.precision + 0.2 * used / copied


def _token_chunks(rows: list[list[int]], slots: int) -> list[tuple[int, int, list[int]]]:
    """Consecutive token ranges whose routed experts fit `slots` at once: (start, end, sorted experts). One range
    when all fit, as they do in decoding; a long prompt with fewer slots than routed experts takes several. A row
    of PRUNED needs none."""
    every = set().union(*rows) - {PRUNED}
    if len(every) <= slots:  # decoding, a verify pass, a short prompt: no per-row walk
        return [(0, len(rows), sorted(every))]
    chunks: list[tuple[int, int, list[int]]] = []
    start, experts = 0, set()
    for row_index, row in enumerate(rows):
        needed = set(row) - {PRUNED}
        if len(experts | needed) > slots and experts:
            chunks.append((start, row_index, sorted(experts)))
            start, experts = row_index, set()
        experts |= needed
    chunks.append((start, len(rows), sorted(experts)))
    return chunks
