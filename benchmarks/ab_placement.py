"""Where the resident layers sit, A/B in one process (decode is launch-bound and varies more between processes
than the variants differ): resident layers spread over the pass (the planner's choice) against one contiguous
block (the order the units come in), alternating, on the 7B checkpoint bench_7b.py builds.

    python benchmarks/ab_placement.py --compress nf4
"""
from __future__ import annotations

import argparse
import statistics

import torch
from transformers import LogitsProcessorList

import tierstore
from common import PROMPT_TOKENS, StepClock, build_checkpoint, prompt_ids


def open_model(args: argparse.Namespace, order: str):
    """The model with its resident layers chosen in `order` (policy.resident_order)."""
    return tierstore.AutoModel.from_pretrained(
        args.model, budget=tierstore.Budget(vram=args.vram, ram=args.ram), dtype=torch.float16,
        config={"runtime": {"cache_dir": args.cache}, "compression": {"format": args.compress},
                "policy": {"resident_order": order}})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="/tmp/llama7b-hf")
    parser.add_argument("--cache", default="/tmp/tierstore-bench-cache")
    parser.add_argument("--vram", default="4GB")
    parser.add_argument("--ram", default="16GB")
    parser.add_argument("--compress", default="nf4")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    build_checkpoint(args.model)
    models = {order: open_model(args, order) for order in ("spread", "contiguous")}
    for name, model in models.items():
        layers = [k for k in model.plan.device_resident if k.startswith("layers.")]
        print(f"{name}: resident {sorted(int(k.split('.')[1]) for k in layers)}, link bound "
              f"{model.plan.predicted['step_s']:.4f} s")
    ids = prompt_ids(1)
    steps: dict[str, list[float]] = {name: [] for name in models}
    tokens = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            clock = StepClock()
            out = model.generate(ids, max_new_tokens=16, do_sample=False, logits_processor=LogitsProcessorList([clock]))
            steps[name].append(clock.summary()["decode_s_per_token"])
            tokens[name] = out[:, PROMPT_TOKENS:].tolist()
    for name, values in steps.items():
        print(f"{name}: median step per call {[round(v, 4) for v in values]}, median {statistics.median(values):.4f}")
    print(f"spread / contiguous = {statistics.median(steps['spread']) / statistics.median(steps['contiguous']):.2f}, "
          f"tokens {'same' if tokens['spread'] == tokens['contiguous'] else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
