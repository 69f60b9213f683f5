"""HQQ beside tierstore's k-quant recipes, data-free, at equal bits: is HQQ a better format to build?

Each decoder-layer matrix of transformers' SmolLM2 (off its grid: quality_off_grid.py's noisy model) is replaced by
its quantized-then-dequantized self, and the model is measured as `tierstore eval` measures (the bundled text,
windows of 512 tokens, top-1 agreement, KL and perplexity against the unquantized model; the same `Agreement`).
HQQ comes from the `hqq` package (Mobius Labs' half-quadratic solver, `Quantizer.quantize` with its defaults,
groups along each row), its scale and zero kept in float32: an upper bound on HQQ as stored (float16 or 8-bit
scales). Its bits are the codes plus 2 × 16 bits a group. CPU, about 4 minutes:

    pip install hqq
    python benchmarks/quality_off_grid.py --out /tmp/offgrid --formats q4_k     # writes the noisy model
    python benchmarks/quality_hqq.py --model /tmp/offgrid/smollm2-noise0.05 --rows q4_k,hqq4g64,hqq4g32,q3_k,hqq3g64
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import measure_swapped

Quantize = Callable[[torch.Tensor], torch.Tensor]  # a matrix -> its dequantized approximation, same shape


def hqq(bits: int, group: int) -> Quantize:
    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        raise SystemExit("quality_hqq.py: the hqq package is not installed (pip install hqq)") from None

    def approximate(weight: torch.Tensor) -> torch.Tensor:
        codes, meta = Quantizer.quantize(weight, nbits=bits, group_size=group, axis=1, bitpack=False,
                                         compute_dtype=torch.float32, device=str(weight.device))
        meta["compute_dtype"] = torch.float32
        return Quantizer.dequantize(codes, meta).reshape(weight.shape)
    return approximate


def ggml(format: str) -> Quantize:
    from tierstore.ggml import dequantize
    from tierstore.ggml_quantize import quantize

    def approximate(weight: torch.Tensor) -> torch.Tensor:
        out = torch.empty(weight.numel(), dtype=torch.float32)
        dequantize(format, quantize(format, weight.reshape(-1).float()), out)
        return out.view(weight.shape)
    return approximate


def nf4(weight: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' nf4 in blocks of 64 with a float32 scale each, as tierstore stores it (4.5 bits)."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    codes, state = quantize_4bit(weight.contiguous(), blocksize=64, quant_type="nf4")
    return dequantize_4bit(codes, state)


def row(name: str) -> tuple[Quantize, float]:
    """A row's quantizer and bits per weight: hqq<bits>g<group>, nf4, or a tierstore recipe (q4_k, q3_k, ...)."""
    from tierstore.compression import GGML_RECIPES
    from tierstore.ggml import bits_per_weight

    if name.startswith("hqq"):
        bits, group = map(int, name[3:].split("g"))
        return hqq(bits, group), bits + 32 / group
    if name == "nf4":
        return nf4, 4.5
    if name not in GGML_RECIPES:
        raise SystemExit(f"quality_hqq.py: unknown row {name!r}; give hqq<bits>g<group>, nf4 or one of "
                         f"{', '.join(GGML_RECIPES)}")
    return ggml(GGML_RECIPES[name]), bits_per_weight(GGML_RECIPES[name])


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tierstore.inference.front.quality import bundled_text, windows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/offgrid/smollm2-noise0.05")
    parser.add_argument("--rows", default="q4_k,hqq4g64,hqq4g32,q3_k,hqq3g64,hqq3g32,hqq2g16,hqq2g32")
    args = parser.parse_args()
    rows = [(name, *row(name)) for name in args.rows.split(",")]
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(args.model)(bundled_text(), return_tensors="pt").input_ids[0]
    parts = windows(ids, 512)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()
                 if ".layers." in name and p.dim() == 2}
    parameters = dict(model.named_parameters())

    def logprobs() -> list[torch.Tensor]:
        return [model(part[None], use_cache=False).logits[0, :-1].float().log_softmax(-1) for part in parts]

    reference = logprobs()
    print(f"{args.model}: {sum(p.numel() for p in parts)} tokens, {len(originals)} matrices")
    print("| row | bits/weight | top-1 | KL mean | KL p99 | ppl change | relative weight error | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, approximate, bits in rows:
        s, error, quantize_s = measure_swapped(logprobs, reference, parts, parameters, originals,
                                               lambda _, weight: approximate(weight))
        print(f"| {name} | {bits:.3f} | {s['top1_agreement']:.2%} | {s['kl_mean']:.4f} | {s['kl_p99']:.3f} | "
              f"{s['perplexity_change']:+.2%} | {error:.3e} | {quantize_s:.1f} |", flush=True)

if __name__ == "__main__":
    main()
