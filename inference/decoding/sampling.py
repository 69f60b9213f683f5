"""Sampling, one module under the three decode loops (transformers' generate, speculation, the batcher): the
probabilities transformers' warpers give, how the next token is chosen, the end-of-sequence ids, and the seed."""
from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import torch

Warp = Callable[[torch.Tensor], torch.Tensor]  # logits (rows, vocab) -> probabilities (rows, vocab)
Choose = Callable[[torch.Tensor], torch.Tensor]  # logits (rows, vocab) -> one token per row


def warp(temperature: float | None, top_k: int | None, top_p: float | None) -> Warp:
    """Logits (rows, vocab) to the probabilities transformers' warpers give for these settings."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))

    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(warpers(None, logits.float()), dim=-1)
    return probabilities


def chooser(do_sample: bool, warped: Warp) -> Choose:
    """How plain decoding picks the next token: argmax, or a sample of the warped distribution."""
    if not do_sample:
        return lambda logits: logits.argmax(dim=-1)
    return lambda logits: torch.multinomial(warped(logits), 1).squeeze(-1)


def sample(logits: torch.Tensor, warped: Warp, generator: torch.Generator | None = None) -> int:
    """One token drawn from the warped distribution of `logits` (1, vocab), with `generator` (None: torch's)."""
    return int(torch.multinomial(warped(logits), 1, generator=generator).item())


def eos_ids(eos: int | list[int] | tuple[int, ...] | None) -> set[int]:
    """The end-of-sequence ids a generation config or a tokenizer names (one, several or none)."""
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A sequence's own random generator: seeded with `seed`, or with a seed drawn from torch's generator."""
    made = torch.Generator(device)
    made.manual_seed(seed if seed is not None else int(torch.randint(2 ** 31, ())))
    return made


def generate_kwargs(temperature: float | None, top_p: float | None, top_k: int | None,
                    seed: int | None) -> tuple[dict[str, Any], int | None]:
    """transformers' generate arguments for these settings (greedy without a temperature), and the seed drawn or
    given when sampling, torch's generator seeded with it. Tensor-parallel ranks all take rank 0's seed."""
    if temperature is None:
        return {"do_sample": False}, None
    seed = seed if seed is not None else secrets.randbits(31)
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # ranks must draw alike
        box = [seed]
        torch.distributed.broadcast_object_list(box, src=0)
        seed = box[0]
    torch.manual_seed(seed)
    return {"do_sample": True, "temperature": temperature, "top_p": top_p or 1.0, "top_k": top_k or 0}, seed
