"""An importance matrix: how much each weight of each decoder-layer linear matters, measured over a calibration text.

The model (opened uncompressed, streamed under its budget like any run) reads the text in windows; a hook on every
`nn.Linear` inside the decoder layers adds up the square of each input feature. The mean square of feature j is
what weight column j multiplies: llama.cpp's importance matrix, which the GGML quantizers use to weigh each weight's
error (ggml_quantize.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import InputError

WINDOW_TOKENS = 512


def measure_importance(model, text: str, window_tokens: int = WINDOW_TOKENS) -> dict[str, torch.Tensor]:
    """Mean square of each input feature of each decoder-layer linear (by its weight's name), float32 on the CPU,
    over `text` read by `model` (a TierstoreModel)."""
    if model.tokenizer is None:
        raise InputError("compression.calibration: the model ships no tokenizer to read the calibration text with")
    ids = model.tokenizer(text, return_tensors="pt").input_ids[0]
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str):
        def add(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            rows[name] = rows.get(name, 0) + x.shape[0]
        return add

    handles = [module.register_forward_pre_hook(hook(f"{name}.weight"))
               for name, module in model.model.named_modules()
               if isinstance(module, nn.Linear) and ".layers." in f".{name}."]
    try:
        with torch.no_grad():
            for start in range(0, ids.numel(), window_tokens):
                window = ids[start:start + window_tokens]
                if window.numel() > 1:
                    model(window[None], use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total / rows[name]).cpu() for name, total in sums.items()}
