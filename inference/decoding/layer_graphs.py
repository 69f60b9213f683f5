"""Decoder layers replayed from CUDA graphs inside a decode step whose other units stream: the launch floor of a
model that does not fit.

A streamed step cannot be one graph: the host decides as it goes which units to copy, and a streamed unit lands in
whichever buffer is free. A layer, though, reads its tensors at whatever addresses its units have, so each is
recorded once as a graph of its own and replayed while its units come back to the addresses it was recorded with:
always, for a resident layer (a packed one dequantized inside the layer into the one scratch buffer); for a
streamed one (unless `runtime.cuda_graphs = "resident"`), while the store lands its units in buffers it has a graph
for (a streamed unit takes turns between a few). A replay costs the host one launch instead of a layer's few hundred
(about a millisecond a layer when eager, more than a small layer's kernels take). A replayed layer's inputs are
copied into the buffers its graph reads, except where they already are: the decoder's fixed buffers (the
position), the previous replayed layer's output; inputs shared by every layer (rotary embeddings, the attention
bias) are copied once a step.

A replayed layer still asks the store for its units and releases them, so that the store's counters and prefetch
see the step as an eager one, and a streamed unit's copy is waited for on the device (the compute stream waits for
its event before the replay). A unit found at another address than at capture gets its layer a graph for that
place too, up to a few places; past them (a re-plan moved it) the layer forgets its graphs and records again, and
one whose units keep moving runs eagerly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .static_forward import record_graph

# record(forward) -> (graph, None) with forward's outputs holding this run's values, or (None, why) after forward ran
# eagerly: `static_forward.record_graph` on a GPU. `forward` returns its outputs (what a replay rewrites in place).
Record = Callable[[Callable[[], Any]], tuple[Any, "str | None"]]
Units = Sequence[tuple[str, int]]  # a layer's units: (key, position in the schedule)


class LayerGraphs:
    """Decoder layers of one model (`units`: layer index -> its units; `resident`: the indices of those whose units
    all stay on the device), each recorded on its second step (the first warms its kernels up) and replayed after,
    while `installed`. The decoder names its buffers, which the graphs read where they are, with `reset` before the
    first step."""

    def __init__(self, layers: nn.ModuleList, units: Mapping[int, Units], store: Any, record: Record,
                 resident: Iterable[int] | None = None) -> None:
        self._layers = layers
        self._record = record
        self._stable: set[int] = set()  # addresses of tensors that stay put across steps
        kept = set(units) if resident is None else set(resident)
        self._graphed = {index: GraphedLayer(layers[index], found, store, self, streamed=index not in kept)
                         for index, found in units.items()}
        self._shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(source) -> (source, its static copy)
        self._filled: dict[int, torch.Tensor] = {}  # static buffer's address -> the source copied there this step
        self.failure: str | None = None  # why a capture failed: every layer runs eagerly from then on
        self.replays = 0
        self.streamed_replays = 0  # of `replays`, those of layers that stream
        self.capture_s = 0.0

    @property
    def count(self) -> int:
        return len(self._graphed)

    @property
    def resident_count(self) -> int:
        return sum(not graphed.streamed for graphed in self._graphed.values())

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """One step's forward with the graphed layers in the layer list replaced by their graphed forms."""
        modules = self._layers._modules
        originals = {str(index): modules[str(index)] for index in self._graphed}
        for index, graphed in self._graphed.items():
            modules[str(index)] = graphed
        try:
            yield
        finally:
            modules.update(originals)
            self._filled.clear()  # the sources of this step's copies may be freed now
            self._shared.clear()

    def new_call(self) -> None:
        """A generate call begins: its prompt may have been fed under a plan that moved units (they are recorded
        again where they landed), so the moves a resident layer is allowed count from here. A streamed layer's
        count from its first step: one whose units land elsewhere pass after pass stays eager instead of paying a
        capture (and the device synchronisation it takes) every few steps of every call."""
        for graphed in self._graphed.values():
            if not graphed.streamed:
                graphed.moves = 0

    def reset(self, stable: Iterable[torch.Tensor] = ()) -> None:
        """Forget every graph: the decoder's buffers were made anew (`stable`: they, which stay at their addresses
        across steps)."""
        self._stable = {tensor.data_ptr() for tensor in stable}
        for graphed in self._graphed.values():
            graphed.forget()

    def static_for(self, source: torch.Tensor) -> torch.Tensor:
        """The buffer a graph being recorded reads `source` from: `source` itself where it stays put (a stable
        buffer, a replayed layer's output), else a copy shared by every layer recorded this step with that input."""
        if source.data_ptr() in self._stable:
            return source
        shared = self._shared.get(id(source))
        if shared is None:
            shared = self._shared[id(source)] = (source, source.clone())
        return shared[1]

    def fill(self, statics: Sequence[Any], sources: Sequence[Any]) -> bool:
        """Copy a replay's tensor inputs into its graph's buffers (each shared buffer once a step); False when an
        input does not fit what the graph was recorded with (the layer then runs eagerly)."""
        for static, source in zip(statics, sources):
            if not isinstance(static, torch.Tensor):
                if static is not source and static != source:
                    return False
                continue
            if source.data_ptr() == static.data_ptr():
                continue
            if source.shape != static.shape or source.dtype != static.dtype:
                return False
            address = static.data_ptr()
            if self._filled.get(address) is source:
                continue
            static.copy_(source)
            self._filled[address] = source
        return True

    def keep_output(self, output: Any) -> None:
        """A recorded layer's outputs stay at their addresses: the next recorded layer reads them where they are."""
        for leaf in pytree.tree_leaves(output):
            if isinstance(leaf, torch.Tensor):
                self._stable.add(leaf.data_ptr())

    def record(self, forward: Callable[[], Any]) -> tuple[Any, str | None]:
        start_s = time.perf_counter()
        graph, failure = self._record(forward)
        self.capture_s += time.perf_counter() - start_s
        if failure is not None:
            self.failure = failure
        return graph, failure


@dataclasses.dataclass
class _Recording:
    """One graph of a layer, for one set of its units' addresses: the buffers it reads its inputs from, how they
    nest (pytree spec), and its outputs (rewritten by each replay)."""

    graph: Any
    statics: list[Any]
    spec: Any
    output: Any


class GraphedLayer(nn.Module):
    """A decoder layer's forward: eager on its first step, recorded on its second, replayed after. A graph reads its
    units where they were when it was recorded, so a layer keeps one for each of up to `VARIANTS` sets of addresses
    (a streamed unit that takes turns between two or three buffers); at another set of addresses the layer runs
    eagerly and forgets its graphs, a move. A resident layer whose units move more than `MOVES` times in a call (a
    plan too tight to keep them put) stays eager for it; a streamed one (`streamed`) stays eager for good."""

    MOVES = 2
    VARIANTS = 4

    def __init__(self, layer: nn.Module, units: Units, store: Any, owner: LayerGraphs, streamed: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: the model's module tree stays as it was
        object.__setattr__(self, "owner", owner)
        self._units, self._store = list(units), store
        self.streamed = streamed
        self.forget()

    def forget(self) -> None:
        self._warm = False
        self.moves = 0
        self.recordings: dict[tuple[int, ...], _Recording] = {}  # by the addresses of the layer's units

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        owner: LayerGraphs = self.owner  # type: ignore[assignment]
        if owner.failure is not None or not self._warm or self.moves > self.MOVES:
            self._warm = True
            return self.layer(*args, **kwargs)
        addresses = self._pin_units()
        try:
            recording = self.recordings.get(addresses)
            if recording is None:
                if len(self.recordings) < self.VARIANTS:
                    return self._capture(args, kwargs, addresses)
                self.moves += 1  # elsewhere again: recorded anew from the next step
                self.recordings.clear()
                return self.layer(*args, **kwargs)
            sources, spec = pytree.tree_flatten((args, kwargs))
            if spec != recording.spec or not owner.fill(recording.statics, sources):
                return self.layer(*args, **kwargs)  # called otherwise than recorded
            recording.graph.replay()
            owner.replays += 1
            owner.streamed_replays += self.streamed
            return recording.output
        finally:
            for key, _ in self._units:
                self._store.release(key)

    def _pin_units(self) -> tuple[int, ...]:
        """What the layer's hooks would ask of the store (each unit served and pinned, counted, the next prefetches
        started), and where its units' tensors are."""
        addresses = []
        for key, position in self._units:
            tensors = self._store.get(key, position)
            addresses.append(next(iter(tensors.values())).data_ptr() if tensors else 0)
        return tuple(addresses)

    def _capture(self, args: tuple[Any, ...], kwargs: dict[str, Any], addresses: tuple[int, ...]) -> Any:
        owner: LayerGraphs = self.owner  # type: ignore[assignment]
        leaves, spec = pytree.tree_flatten((args, kwargs))
        statics = [owner.static_for(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(statics, spec)
        result: list[Any] = [None]

        def forward() -> Any:
            result[0] = self.layer(*static_args, **static_kwargs)
            return result[0]

        graph, failure = owner.record(forward)
        if failure is None:
            self.recordings[addresses] = _Recording(graph, statics, spec, result[0])
            owner.keep_output(result[0])
        return result[0]


def layer_units(schedule: Sequence[str]) -> dict[int, list[tuple[str, int]]]:
    """Each decoder layer's units (index -> units as (key, position in `schedule`))."""
    units: dict[int, list[tuple[str, int]]] = {}
    for position, key in enumerate(schedule):
        parts = key.split(".")
        if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit():
            units.setdefault(int(parts[1]), []).append((key, position))
    return units


def resident_layers(schedule: Sequence[str], device_resident: Iterable[str]) -> dict[int, list[tuple[str, int]]]:
    """The decoder layers (index -> units as (key, position in `schedule`)) whose every unit stays on the device."""
    kept = set(device_resident)
    return {index: found for index, found in layer_units(schedule).items() if all(key in kept for key, _ in found)}


def cuda_record(device: torch.device) -> Record:
    """Recording on `device`'s GPU, every graph in one memory pool (replayed one at a time, in recording order)."""
    pool = torch.cuda.graph_pool_handle()
    return lambda forward: record_graph(forward, device, pool)
