"""What a new key length costs each attention backend: the first call of PyTorch's scaled_dot_product_attention
at each of eight new lengths, one decode query (Llama-2-7B's 32 heads of 128), fp16, with and without a mask.
A decode step meets a new length every time; cuDNN builds a plan for each (why tierstore leaves it out, see
`inference/model.py`).

    python benchmarks/sdpa_lengths.py
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def first_calls_ms(backend: SDPBackend | None, masked: bool, lengths: range) -> list[float] | str:
    """Milliseconds of the first call at each length (each one new to the process), or why none ran."""
    query = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
    times = []
    for length in lengths:
        keys = torch.randn(1, 32, length, 128, device="cuda", dtype=torch.float16)
        mask = torch.ones(1, 1, 1, length, device="cuda", dtype=torch.bool) if masked else None
        torch.cuda.synchronize()
        start_s = time.perf_counter()
        try:
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                F.scaled_dot_product_attention(query, keys, keys, attn_mask=mask)
        except RuntimeError as exc:
            return str(exc).splitlines()[0]
        torch.cuda.synchronize()
        times.append(round((time.perf_counter() - start_s) * 1e3, 2))
    return times


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for offset, (name, backend) in enumerate(BACKENDS.items()):
        for masked in (False, True):
            start = 33 + 1000 * offset + 100 * masked  # lengths no earlier row has used
            result = first_calls_ms(backend, masked, range(start, start + 8))
            print(f"{name:>9} {'mask' if masked else 'no mask':>7}: {result}")


if __name__ == "__main__":
    main()
