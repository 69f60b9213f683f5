"""An importance matrix: how much each weight of each decoder-layer linear matters, measured over a calibration text.

The model (opened uncompressed, streamed under its budget like any run) reads the text in windows; a hook on every
`nn.Linear` inside the decoder layers adds up the square of each input feature. The mean square of feature j is
what weight column j multiplies: llama.cpp's importance matrix, which the GGML quantizers use to weigh each weight's
error (ggml_quantize.py).

For mixed precision (allocation.py) the same model also measures each linear's sensitivity: the mean KL divergence
of the next-token distribution per unit of relative squared error added to that linear's output (Gaussian noise,
one linear at a time, over one window). At small errors the KL grows linearly with that error (HIGGS' linearity),
so a matrix's relative quantization error times its sensitivity predicts what quantizing it costs.

For GPTQ rounding (gptq.py) each linear needs its inputs' whole second moment, a columns x columns matrix: too
large to keep for every linear of a big model at once. So the text's windows go through the model as one batch,
each linear sees every token in one call, and its blocks are made right there, while its layer's weights are
present; the second moment lives only until the next linear's input arrives.
"""
from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence

import torch
from torch import nn

from ...rotation import applies as rotates
from ...rotation import rotate, rotate_hessian
from ...allocation import SENSITIVITY
from ...errors import InputError
from ...gptq import blocks_key, error_key, output_error, quantize_gptq

WINDOW_TOKENS = 512
GPTQ_TOKENS = 8192  # the most calibration tokens GPTQ reads: they go through the model at once
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

    handles = [module.register_forward_pre_hook(hook(f"{name}.weight")) for name, module in _linears(model)]
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
    linears = _linears(model)
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


def measure_rounding(model, text: str, formats: Callable[[str, tuple[int, ...]], Sequence[str]],
                     into: MutableMapping[str, torch.Tensor] | None = None, rotated: bool = False,
                     max_tokens: int = GPTQ_TOKENS,
                     window_tokens: int = WINDOW_TOKENS) -> MutableMapping[str, torch.Tensor]:
    """Each decoder-layer linear's GPTQ blocks in each of `formats(name, shape)` (by its weight's name) and their
    relative output errors over the calibration text (keys: gptq.blocks_key and error_key; blocks on the CPU),
    from one forward of the text's first `max_tokens` tokens in windows of equal length, batched. They are put
    into `into` as each is made (a SpilledTensors parks the blocks on disk), which is returned (a new dict when
    None). `rotated`: a matrix whose columns come in whole blocks is rounded as W R, its inputs' second moment as
    Rᵀ H R (rotation.py)."""
    ids = _token_ids(model, text)[:max_tokens]
    count = -(-ids.numel() // window_tokens)
    length = ids.numel() // count
    if length < 2:
        raise InputError(f"compression.calibration: {ids.numel()} tokens; GPTQ needs at least 2")
    results = {} if into is None else into
    shared: dict[str, object] = {}  # the last input's second moment: q, k and v (gate and up) read one input

    def second_moment(x: torch.Tensor) -> torch.Tensor:
        if shared.get("input") is not x:
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            shared.update(input=x, hessian=flat.T @ flat)
        return shared["hessian"]  # type: ignore[return-value]

    def hook(name: str):
        def quantize(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            weight = module.weight.detach()
            shape = tuple(weight.shape)
            turned = rotated and rotates(shape)
            if turned:
                weight = rotate(weight, name)
            for format in formats(name, shape):
                hessian = second_moment(inputs[0])
                if turned:
                    hessian = rotate_hessian(hessian, name)
                try:
                    blocks, error = _rounded(format, weight, hessian)
                except torch.cuda.OutOfMemoryError:  # a wide matrix's inverse beside the layer: round on the CPU
                    blocks, error = _rounded(format, weight.cpu(), hessian.cpu())
                results[blocks_key(name, format)] = blocks.cpu()
                results[error_key(name, format)] = torch.tensor(error)
        return quantize

    handles = [module.register_forward_pre_hook(hook(f"{name}.weight")) for name, module in _linears(model)]
    try:
        with torch.no_grad():
            model(ids[:count * length].view(count, length), use_cache=False, logits_to_keep=1)
    finally:
        shared.clear()
        for handle in handles:
            handle.remove()
    return results


def _rounded(format: str, weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, float]:
    """GPTQ's blocks of `weight` in `format` and their relative output error, on weight's device."""
    blocks = quantize_gptq(format, weight, hessian)
    return blocks, output_error(format, blocks, weight, hessian)


def _linears(model) -> list[tuple[str, nn.Module]]:
    """The decoder layers' nn.Linear modules of `model` (a TierstoreModel), by name."""
    return [(name, module) for name, module in model.model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in f".{name}."]


def _token_ids(model, text: str) -> torch.Tensor:
    """The calibration text as `model`'s token ids (1-D); InputError when it ships no tokenizer."""
    if model.tokenizer is None:
        raise InputError("compression.calibration: the model ships no tokenizer to read the calibration text with")
    return model.tokenizer(text, return_tensors="pt").input_ids[0]
