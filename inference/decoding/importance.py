"""An importance matrix: how much each weight of each decoder-layer linear matters, measured over a calibration text.

The model (opened uncompressed, streamed under its budget like any run) reads the text in windows; a hook on every
`nn.Linear` inside the decoder layers adds up the square of each input feature. The mean square of feature j is
what weight column j multiplies: llama.cpp's importance matrix, which the GGML quantizers use to weigh each weight's
error (ggml_quantize.py).

For mixed precision (allocation.py) the same model also measures each linear's sensitivity: the mean KL divergence
of the next-token distribution per unit of relative squared error added to that linear's output (Gaussian noise,
one linear at a time, over one window). At small errors the KL grows linearly with that error (HIGGS' linearity),
so a matrix's relative quantization error times its sensitivity predicts what quantizing it costs.
"""
from __future__ import annotations

import torch
from torch import nn

from ...allocation import SENSITIVITY
from ...errors import InputError

WINDOW_TOKENS = 512
SENSITIVITY_TOKENS = 256  # the window each linear's noise is measured over
NOISE_RELATIVE_MSE = 0.01  # the relative squared error added to a linear's output to measure its sensitivity


def measure_importance(model, text: str, window_tokens: int = WINDOW_TOKENS) -> dict[str, torch.Tensor]:
    """Mean square of each input feature of each decoder-layer linear (by its weight's name), float32 on the CPU,
    over `text` read by `model` (a TierstoreModel)."""
    ids = _token_ids(model, text)
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


def measure_sensitivity(model, text: str, window_tokens: int = SENSITIVITY_TOKENS,
                        relative_mse: float = NOISE_RELATIVE_MSE) -> dict[str, torch.Tensor]:
    """Each decoder-layer linear's sensitivity (by its weight's name + SENSITIVITY, a 0-d float32 tensor): the mean
    KL divergence, over the first window of `text`, of the model's next-token distributions when Gaussian noise of
    `relative_mse` times its output's mean square is added to that linear's output, divided by `relative_mse`."""
    ids = _token_ids(model, text)[:window_tokens][None]
    linears = [(name, module) for name, module in model.model.named_modules()
               if isinstance(module, nn.Linear) and ".layers." in f".{name}."]
    generator = torch.Generator().manual_seed(0)

    def noisy(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(output.shape, generator=generator).to(output.device, output.dtype)
        return output + noise * (relative_mse * output.float().pow(2).mean()).sqrt().to(output.dtype)

    def log_probs() -> torch.Tensor:
        return torch.log_softmax(model(ids, use_cache=False).logits[0].float(), dim=-1)

    sensitivity = {}
    with torch.no_grad():
        reference = log_probs()
        for name, module in linears:
            handle = module.register_forward_hook(noisy)
            try:
                kl = (reference.exp() * (reference - log_probs())).sum(-1).mean()
            finally:
                handle.remove()
            sensitivity[f"{name}.weight{SENSITIVITY}"] = (kl / relative_mse).float().cpu()
    return sensitivity


def _token_ids(model, text: str) -> torch.Tensor:
    """The calibration text as `model`'s token ids (1-D); InputError when it ships no tokenizer."""
    if model.tokenizer is None:
        raise InputError("compression.calibration: the model ships no tokenizer to read the calibration text with")
    return model.tokenizer(text, return_tensors="pt").input_ids[0]
