"""Every format's quality on SmolLM2, on its own weights and on weights moved off their 4-bit grid.

SmolLM2-135M-Instruct's weights come from a Q4_1 GGUF: every 32 of them lie on a 4-bit grid with a scale and a
minimum. A format with that grid reproduces them almost exactly, which says nothing about other models. So the
decoder layers' matrices also get Gaussian noise (--noise times each matrix's standard deviation, seeded), the
noisy model is written as a safetensors checkpoint, checked to still answer sensibly (its greedy answer is printed),
and `tierstore eval` measures every format against it. CPU, about 10 minutes:
    python benchmarks/quality_off_grid.py --out /tmp/offgrid [--calibration bundled --formats q4_k,q4_k_m]
"""
from __future__ import annotations

import argparse
import json
import os

from tierstore.config import COMPRESSION_FORMATS

PROMPT = "What is the capital of France? Answer in one sentence."


def answer(model_dir: str) -> str:
    """The model's greedy answer to PROMPT: the check that noise left it speaking."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    from tierstore.inference.front.cli import main as tierstore
    from tierstore.inference.front.quality import write_off_grid
    from tierstore.inference.loading.resolve import resolve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/offgrid")
    parser.add_argument("--noise", type=float, default=0.05, help="noise std as a fraction of each matrix's std")
    parser.add_argument("--formats", default=",".join(COMPRESSION_FORMATS))
    parser.add_argument("--calibration", help="compression.calibration for the GGML formats (e.g. bundled)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    config = os.path.join(args.out, "eval.toml")
    with open(config, "w") as handle:
        handle.write(f'[compression]\ncalibration = "{args.calibration}"\n' if args.calibration else "")
    noisy = os.path.join(args.out, f"smollm2-noise{args.noise}")
    write_off_grid(resolve("smollm2").path, noisy, args.noise)
    print(f"off the grid (noise {args.noise}): {answer(noisy)!r}", flush=True)
    results = {}
    for name, model in (("on the grid", "smollm2"), (f"off the grid, noise {args.noise}", noisy)):
        path = os.path.join(args.out, f"eval-{'on' if model == 'smollm2' else 'off'}.json")
        tierstore(["eval", model, "--formats", args.formats, "--json", path, "--config", config])
        with open(path) as handle:
            results[name] = json.load(handle)
    with open(os.path.join(args.out, "quality.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
