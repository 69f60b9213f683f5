"""Pre/post-forward hooks that lend a module its unit's tensors from the store, and detach exactly."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...compression import Decompressor
from ...errors import ModelError
from ...store import TieredStore
from ...trace import COMPUTE, PASSES, Tracer
from ..loading.skeleton import Binding, HookSite, Skeleton

Hook = Callable[..., None]


# Token rows up to which a decode step multiplies a unit's GGML matrices in their blocks (Decompressor.matvec: each
# weight's packed bits read once) instead of dequantizing the unit into the scratch buffer and reading that back:
# a Q2_K matrix's 16-bit copy costs six times its packed bytes in writes alone, and as much again to read.
PACKED_MATVEC_TOKENS = 4


def _make_hooks(site: HookSite, store: TieredStore,
                decompressor: Decompressor | None) -> tuple[Hook, Hook, list[tuple[nn.Module, Hook, Hook]],
                                                            list[tuple[nn.Module, Callable[..., Any]]]]:
    """The site's pre- and post-forward hooks; for a unit dequantized matrix by matrix, each matrix's own
    (module, pre, post), bound as its nn.Linear runs inside the site's forward; for a unit whose matrices can be
    multiplied in their blocks, each matrix's nn.Linear's forward (module, forward: `_packed_forward`)."""
    key, position = site.key, site.position
    compressed = decompressor is not None and key in decompressor
    per_matrix = compressed and key in decompressor.per_matrix  # type: ignore[union-attr]
    fused = bool(fused_bindings := _packed_bindings(site, decompressor))
    matrices = decompressor.matrix_names(key) if per_matrix or fused else frozenset()  # type: ignore[union-attr]
    bindings = [(b.module._parameters, b.attr, b.tensor, b.original) for b in site.bindings
                if b.tensor not in matrices]
    unpack = decompressor.materialize if compressed and not per_matrix else None  # type: ignore[union-attr]
    held: list[Any] = [None]  # the unit's stored tensors while its forward runs
    unpacked: list[Any] = [None]  # a fused unit dequantized whole in this forward (a call of many tokens)

    def pre_forward(module: nn.Module, args: Any) -> None:
        if held[0] is not None:  # bound early, from the parent's forward (see HookSite.bind_from)
            return
        tensors = store.get(key, position)
        held[0] = tensors
        if unpack is not None and not fused:
            tensors = unpack(key, tensors)
        for params, attr, tensor, _ in bindings:
            params[attr] = tensors[tensor]

    def post_forward(module: nn.Module, args: Any, output: Any) -> None:
        if held[0] is None:
            return
        for params, attr, _, original in bindings:
            params[attr] = original
        held[0] = unpacked[0] = None
        store.release(key)

    def matrix_hooks(binding: Binding) -> tuple[nn.Module, Hook, Hook]:
        params, attr, tensor, original = binding.module._parameters, binding.attr, binding.tensor, binding.original

        def pre_matrix(module: nn.Module, args: Any) -> None:
            params[attr] = decompressor.materialize_matrix(key, tensor, held[0])  # type: ignore[union-attr]

        def post_matrix(module: nn.Module, args: Any, output: Any) -> None:
            params[attr] = original

        return binding.module, pre_matrix, post_matrix

    if fused:
        def weight(name: str) -> torch.Tensor:  # a call of many tokens: the matrix dequantized
            if per_matrix:
                return decompressor.materialize_matrix(key, name, held[0])  # type: ignore[union-attr]
            if unpacked[0] is None:  # the whole unit, once this forward
                unpacked[0] = unpack(key, held[0])  # type: ignore[misc]
            return unpacked[0][name]

        def matvec(name: str, x: torch.Tensor) -> torch.Tensor | None:
            return decompressor.matvec(key, name, held[0], x)  # type: ignore[union-attr]

        return pre_forward, post_forward, [], [(b.module, _packed_forward(b.module, b.tensor, matvec, weight))
                                               for b in fused_bindings]
    return pre_forward, post_forward, [matrix_hooks(b) for b in site.bindings if b.tensor in matrices], []


def _packed_bindings(site: HookSite, decompressor: Decompressor | None) -> list[Binding]:
    """The nn.Linear weights of the site's unit when each of its compressed matrices is one and can be multiplied
    in its blocks (Decompressor.multiplies_packed); else none."""
    if decompressor is None or site.key not in decompressor or not decompressor.multiplies_packed(site.key):
        return []
    names = decompressor.matrix_names(site.key)
    found = [b for b in site.bindings if b.tensor in names and type(b.module) is nn.Linear and b.attr == "weight"]
    return found if len(found) == len(names) else []


def _packed_forward(module: nn.Module, name: str, matvec: Callable[[str, torch.Tensor], torch.Tensor | None],
                    weight: Callable[[str], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An nn.Linear's forward for matrix `name` kept packed: a few tokens multiply it in its blocks (`matvec`),
    more (or a kernel that is not there after all) multiply its dequantized `weight`."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= PACKED_MATVEC_TOKENS * x.shape[-1]:
            out = matvec(name, x)
            if out is not None:
                return out if module.bias is None else out + module.bias
        return nn.functional.linear(x, weight(name), module.bias)

    return forward


def _traced(pre_forward: Callable[..., None], post_forward: Callable[..., None], site: HookSite, nbytes: int,
            tracer: Tracer) -> tuple[Callable[..., None], Callable[..., None]]:
    """The hooks, plus a compute event from the unit's arrival to the end of its forward."""
    started: list[Any] = [None]

    def pre_traced(module: nn.Module, args: Any) -> None:
        pre_forward(module, args)
        started[0] = tracer.stamp()

    def post_traced(module: nn.Module, args: Any, output: Any) -> None:
        tracer.span(COMPUTE, site.key, started[0], tracer.stamp(), unit=site.key, bytes=nbytes)
        post_forward(module, args, output)

    return pre_traced, post_traced


def _pass_hooks(tracer: Tracer) -> tuple[Callable[..., None], Callable[..., None]]:
    """Hooks on the whole model: one pass event per forward, with the tokens it carried."""
    started: list[Any] = [None, 0, 0]

    def pre_pass(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        tokens = int(ids.shape[0] * ids.shape[1]) if ids is not None and ids.dim() >= 2 else 0
        started[:] = [tracer.stamp(), tracer.begin_pass(), tokens]

    def post_pass(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        start, index, tokens = started
        tracer.span(PASSES, f"pass {index}", start, tracer.stamp(), index=index, tokens=tokens)

    return pre_pass, post_pass


class AttachedHooks:
    """The hooks of one model, a module adapter (adapters.py): made, they lend each site its unit's tensors and
    move the skeleton's buffers to the device; `detach` removes them and leaves every module as it was."""

    def __init__(self, skeleton: Skeleton, store: TieredStore, device: torch.device,
                 decompressor: Decompressor | None = None, tracer: Tracer | None = None) -> None:
        if decompressor is not None:
            _check_not_nested([site for site in skeleton.sites if site.key in decompressor])
        self._handles = []
        self._moved_buffers = move_buffers(skeleton.model, device)
        self._forwards: list[nn.Module] = []  # modules whose forward is replaced while attached
        for site in skeleton.sites:
            pre_forward, post_forward, matrix_hooks, forwards = _make_hooks(site, store, decompressor)
            for module, forward in forwards:
                module.forward = forward
                self._forwards.append(module)
            for module, pre_matrix, post_matrix in matrix_hooks:
                self._handles.append(module.register_forward_pre_hook(pre_matrix))
                self._handles.append(module.register_forward_hook(post_matrix))
            if site.bind_from is not None:  # the same hooks, untraced: each does nothing when the other has
                self._handles.append(site.bind_from.register_forward_pre_hook(pre_forward))
                self._handles.append(site.bind_from.register_forward_hook(post_forward))
            if tracer is not None:
                pre_forward, post_forward = _traced(pre_forward, post_forward, site, store.layouts[site.key].nbytes,
                                                    tracer)
            self._handles.append(site.module.register_forward_pre_hook(pre_forward))
            self._handles.append(site.module.register_forward_hook(post_forward))
        if tracer is not None:
            pre_pass, post_pass = _pass_hooks(tracer)
            self._handles.append(skeleton.model.register_forward_pre_hook(pre_pass, with_kwargs=True))
            self._handles.append(skeleton.model.register_forward_hook(post_pass, with_kwargs=True))
        self._sites = skeleton.sites

    def detach(self) -> None:
        """Remove every hook, put back the meta parameters and the original buffers."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._forwards:
            module.__dict__.pop("forward", None)
        self._forwards.clear()
        for site in self._sites:
            for binding in site.bindings:
                binding.module._parameters[binding.attr] = binding.original
        restore_buffers(self._moved_buffers)


MovedBuffers = list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor]]


def move_buffers(model: nn.Module, device: torch.device) -> MovedBuffers:
    """Put every buffer of `model` (rotary frequencies and the like) on `device`; what `restore_buffers` undoes."""
    moved: MovedBuffers = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                moved.append((module._buffers, name, buffer))
                module._buffers[name] = buffer.to(device)
    return moved


def restore_buffers(moved: MovedBuffers) -> None:
    for buffers, name, original in moved:
        buffers[name] = original
    moved.clear()


def _check_not_nested(sites: list[HookSite]) -> None:
    """Compressed units share one dequantization buffer, so no two may be in use at once: none of their modules
    may run inside another's."""
    for outer in sites:
        inner = {id(module) for module in outer.module.modules() if module is not outer.module}
        for other in sites:
            if id(other.module) in inner:
                raise ModelError(f"compressed units {outer.key!r} and {other.key!r} would be in use at once "
                                 f"(one module inside the other); run this model uncompressed")
