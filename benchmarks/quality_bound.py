"""What the best possible quantizer would reach on a model: error at the rate-distortion bound, placed by GPTQ.

A code as good as any can be at R bits per weight (QTIP-class trellis codes come within ~0.1 dB) on weights made
Gaussian by a random rotation leaves each weight an error of variance mean(W²)·2^(-2R), the Gaussian
rate-distortion bound. This script adds exactly that error to each decoder-layer matrix, column by column, and
folds each column's error into the columns not yet quantized as GPTQ (LDLQ) does with its inputs' second moment over
the bundled calibration text; so the error is shaped as a real calibrated quantizer would shape it. The model is then
measured as `tierstore eval` measures it (the bundled eval text, windows of 512, top-1 agreement, KL, perplexity
against the unquantized model). Rows: tierstore's GPTQ onto Q4_K (the same machinery on a real grid, for
comparison), the bound with error feedback, and without (i.i.d. error). CPU, a few minutes a row:

    python benchmarks/quality_bound.py --model /tmp/offgrid/smollm2-noise0.05 --rows gptq:q4_k,bound:4.5,bound:3.5
"""
from __future__ import annotations

import argparse
import math

import torch
from common import measure_swapped
from torch import nn


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tierstore.calibration import calibration_text
    from tierstore.compression import GGML_RECIPES
    from tierstore.ggml import dequantize
    from tierstore.gptq import DAMPING, _inverse_cholesky, quantize_gptq
    from tierstore.inference.front.quality import bundled_text, windows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/offgrid/smollm2-noise0.05")
    parser.add_argument("--rows", default="gptq:q4_k,bound:4.5,bound:4.0,bound:3.5,iid:4.5",
                        help="gptq:<recipe>, bound:<bits> (error feedback) or iid:<bits> (none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    parts = windows(tokenizer(bundled_text(), return_tensors="pt").input_ids[0], 512)
    linears = {f"{name}.weight": module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and ".layers." in name}
    hessians: dict[str, torch.Tensor] = {}

    def add_moment(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            hessians[name] = hessians.get(name, 0) + x.T @ x
        return hook

    handles = [module.register_forward_pre_hook(add_moment(name)) for name, module in linears.items()]
    for window in windows(tokenizer(calibration_text("bundled"), return_tensors="pt").input_ids[0], 512):
        model(window[None], use_cache=False)
    for handle in handles:
        handle.remove()
    originals = {name: module.weight.detach().clone() for name, module in linears.items()}
    weights = {name: module.weight for name, module in linears.items()}

    def logprobs() -> list[torch.Tensor]:
        return [model(part[None], use_cache=False).logits[0, :-1].float().log_softmax(-1) for part in parts]

    reference = logprobs()

    def at_bound(weight: torch.Tensor, hessian: torch.Tensor, bits: float, feedback: bool,
                 generator: torch.Generator) -> torch.Tensor:
        sigma = math.sqrt(float(weight.square().mean()) * 2 ** (-2 * bits))
        if not feedback:
            return weight + torch.randn(weight.shape, generator=generator) * sigma
        h = hessian.clone()
        h.diagonal()[h.diagonal() <= 0] = 1
        order = torch.argsort(h.diagonal(), descending=True)  # act order, as tierstore's GPTQ
        w, h = weight[:, order].clone(), h[order][:, order]
        h.diagonal().add_(DAMPING * float(h.diagonal().mean()))
        upper = _inverse_cholesky(h)
        out = torch.empty_like(w)
        for first in range(0, w.shape[1], 128):  # GPTQ's lazy batches
            last = min(first + 128, w.shape[1])
            errors = torch.empty(w.shape[0], last - first)
            for j in range(first, last):
                out[:, j] = w[:, j] + torch.randn(w.shape[0], generator=generator) * sigma
                error = (w[:, j] - out[:, j]) / upper[j, j]
                w[:, j + 1:last] -= error[:, None] * upper[j, j + 1:last][None, :]
                errors[:, j - first] = error
            w[:, last:] -= errors @ upper[first:last, last:]
        return out[:, torch.argsort(order)]

    def gptq(weight: torch.Tensor, hessian: torch.Tensor, recipe: str) -> torch.Tensor:
        format = GGML_RECIPES[recipe]
        out = torch.empty(weight.numel())
        dequantize(format, quantize_gptq(format, weight, hessian), out)
        return out.view_as(weight)

    print(f"{args.model}: {sum(p.numel() for p in parts)} tokens, {len(linears)} matrices, seed {args.seed}")
    print("| row | top-1 | KL mean | ppl change | relative weight error | s |")
    print("|---|---|---|---|---|---|")
    for row in args.rows.split(","):
        kind, value = row.split(":")
        generator = torch.Generator().manual_seed(args.seed)

        def approximate(name: str, weight: torch.Tensor) -> torch.Tensor:
            if kind == "gptq":
                return gptq(weight, hessians[name], value)
            return at_bound(weight, hessians[name], float(value), kind == "bound", generator)

        s, error, spent_s = measure_swapped(logprobs, reference, parts, weights, originals, approximate)
        print(f"| {row} | {s['top1_agreement']:.2%} | {s['kl_mean']:.4f} | {s['perplexity_change']:+.2%} | "
              f"{error:.2e} | {spent_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
