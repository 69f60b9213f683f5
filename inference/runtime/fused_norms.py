"""transformers' RMSNorm run by torch's fused kernel: two kernels where its own forward launches eight.

LlamaRMSNorm's forward (and that of the classes copied from it: Qwen2/3, Mistral, Mixtral, Phi-3, DeepSeek-V2/3,
...) casts to float32, squares, averages, adds epsilon, takes the reciprocal square root, multiplies, casts back
and multiplies by the weight: eight kernels on a GPU. A decode step's row is a few KB, so each kernel is its launch,
a microsecond or two even replayed from a CUDA graph, and a 7B step runs 57 norms. `torch.nn.functional.rms_norm`
does the first six in one kernel (float32 inside, the normalised row rounded once to the input's dtype, as
transformers rounds it), then the weight multiplies it as transformers does (`weight * normalised`, the same dtypes
and promotion), so the result differs from transformers' only by the order the mean's sum is taken in.

Only modules whose class's forward is transformers' own (the same bytecode, constants and names as
LlamaRMSNorm.forward) are changed; the others (Gemma's `1 + weight`, OLMo-2's, ...) keep theirs. A module adapter
(adapters.py): `detach` gives each module its class's forward back.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn


@functools.cache
def _reference_code() -> tuple:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _code(LlamaRMSNorm)


def _code(cls: type) -> tuple:
    """What makes a forward the same function: its bytecode, constants and names."""
    code = getattr(cls.forward, "__code__", None)
    return (code.co_code, code.co_consts, code.co_names) if code is not None else ()


def is_llama_norm(module: nn.Module) -> bool:
    """Whether `module` runs transformers' LlamaRMSNorm forward (its own class or a copy of it)."""
    return hasattr(module, "variance_epsilon") and _code(type(module)) == _reference_code()


def fused_forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward in two kernels: torch's rms_norm, then transformers' multiply by the weight."""
    normalised = nn.functional.rms_norm(hidden_states, (hidden_states.shape[-1],), None, module.variance_epsilon)
    return module.weight * normalised


class FusedNorms:
    """Every LlamaRMSNorm-like module of `modules` run by `fused_forward` until `detach`."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = [module for module in modules if is_llama_norm(module)]
        for module in self.modules:
            module.forward = functools.partial(fused_forward, module)  # type: ignore[method-assign]

    def detach(self) -> None:
        """Each module with its class's forward again."""
        for module in self.modules:
            vars(module).pop("forward", None)
