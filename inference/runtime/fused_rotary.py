"""transformers' rotary position embedding in one kernel on a GPU, where its own function launches ten.

The attention modules of most decoders (Llama's and the copies of it: Qwen2/3 and their MoE, Mistral, Mixtral,
Phi-3, DeepSeek-V3, Granite, SmolLM3, ...) call their modeling module's `apply_rotary_pos_emb(q, k, cos, sin)`,
which multiplies, negates, concatenates and adds: ten kernels a layer on a GPU, each a launch for a decode step's
few hundred values. `FusedRotary` points that module-level name at `fused_apply`, which runs
rotary_kernel.rotate (one kernel, transformers' roundings, so the same values bit for bit) for CUDA tensors of the
usual layout and the original function for anything else. A modeling module is changed only where its function
gives, on a probe of random rows, exactly what transformers' formula gives (so a model whose rotary differs, or
that a hub kernel replaced, keeps its own); the name is process-wide, so each change is counted and the last
model to close puts the original back.
"""
from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# Where the kernel runs: CUDA, checked on an H100 (2026-12-07: tests/test_cuda.py's rotary tests, bit for bit in
# bfloat16, float16 and float32, and a graphed decode's tokens and logits); tests add "cpu" under the interpreter.
DEVICES = ("cuda",)
_NAME = "apply_rotary_pos_emb"
_lock = threading.Lock()
_patched: dict[str, tuple[Callable, int]] = {}  # modeling module -> (its own function, models using the change)


def reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' formula (Llama's apply_rotary_pos_emb with its rotate_half)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def fits_kernel(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether the kernel takes these tensors: on a DEVICES device, one float dtype, q and k [batch, heads,
    positions, width] and cos, sin [batch or 1, positions, width] (unsqueezed at 1), an even width, every last
    dimension contiguous, and no gradient asked for (the kernel has no backward)."""
    tensors = (q, k, cos, sin)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return (unsqueeze_dim == 1 and q.device.type in DEVICES and q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3
            and all(t.device == q.device and t.dtype == q.dtype and t.stride(-1) == 1 for t in tensors)
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] % 2 == 0
            and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:] and cos.shape == sin.shape
            and cos.shape[0] in (1, q.shape[0]) and tuple(cos.shape[1:]) == tuple(q.shape[2:]))


def fused_apply(original: Callable, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                unsqueeze_dim: int = 1, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary_kernel.rotate where it fits the tensors, else `original`'s answer (and under torch.compile, whose
    own kernels fuse transformers' steps: a compiled draft traces transformers' function)."""
    if kwargs or torch.compiler.is_compiling() or not fits_kernel(q, k, cos, sin, unsqueeze_dim):
        return original(q, k, cos, sin, unsqueeze_dim, **kwargs)
    from .rotary_kernel import rotate

    return rotate(q, k, cos, sin)


def is_transformers_rotary(function: Callable) -> bool:
    """Whether `function` computes transformers' formula: the same values, bit for bit, on a probe of random rows
    in float32 (a function of other arguments or another formula is not)."""
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8, generator=generator), torch.randn(1, 1, 3, 8, generator=generator)
    cos, sin = torch.randn(1, 3, 8, generator=generator), torch.randn(1, 3, 8, generator=generator)
    try:
        got = function(q, k, cos, sin)
    except Exception:  # noqa: BLE001 (another signature: not this function)
        return False
    want = reference(q, k, cos, sin)
    return isinstance(got, tuple) and len(got) == 2 and all(
        isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want))


def modeling_modules(modules: Iterable[nn.Module]) -> set[str]:
    """The modeling modules whose `apply_rotary_pos_emb` the attention modules among `modules` call."""
    names = set()
    for module in modules:
        forward = getattr(type(module), "forward", None)  # unwrapped: where its code looks up global names
        scope = getattr(inspect.unwrap(forward), "__globals__", {}) if forward is not None else {}
        if type(module).__name__.endswith("Attention") and _NAME in scope:
            names.add(scope["__name__"])
    return names


def fusable(modules: Iterable[nn.Module]) -> list[str]:
    """The modeling modules of `modules`' attention layers whose rotary function is (or already runs) the kernel."""
    with _lock:
        return [name for name in sorted(modeling_modules(modules))
                if name in _patched or is_transformers_rotary(getattr(sys.modules[name], _NAME))]


class FusedRotary:
    """The modeling modules of `modules`' attention layers calling `fused_apply` until `detach`; `device`: only
    one of DEVICES changes anything."""

    def __init__(self, modules: Iterable[nn.Module], device: torch.device) -> None:
        self.names: list[str] = []
        if device.type not in DEVICES:
            return
        with _lock:
            for name in sorted(modeling_modules(modules)):
                module = sys.modules[name]
                if name in _patched:
                    original, users = _patched[name]
                    _patched[name] = original, users + 1
                elif is_transformers_rotary(getattr(module, _NAME)):
                    original = getattr(module, _NAME)
                    _patched[name] = original, 1
                    setattr(module, _NAME, functools.partial(fused_apply, original))
                else:
                    continue
                self.names.append(name)

    def detach(self) -> None:
        """Each changed module's own function back once no open model uses the change."""
        with _lock:
            for name in self.names:
                original, users = _patched[name]
                if users > 1:
                    _patched[name] = original, users - 1
                else:
                    del _patched[name]
                    setattr(sys.modules[name], _NAME, original)
            self.names = []
