"""Where N ranks' greedy tokens part from one GPU's, and why: each step's logits under N ranks, saved by rank 0,
then two such runs compared step by step (their largest logit difference, and each run's two best tokens).

On the inflated SmolLM2 that bench_tp.py writes (/tmp/smollm2-tp), on nvidia-h200-x2:
    torchrun --nproc-per-node 1 benchmarks/tp_margins.py run /tmp/smollm2-tp $OUT/n1.pt
    torchrun --nproc-per-node 2 benchmarks/tp_margins.py run /tmp/smollm2-tp $OUT/n2.pt
    python benchmarks/tp_margins.py compare $OUT/n1.pt $OUT/n2.pt
"""
from __future__ import annotations

import os
import sys

import torch

from common import QUESTION, first_difference


def run(model_path: str, out: str, vram: str = "4GB", ram: str = "16GB", tokens: int = 48) -> None:
    """This process's rank of a greedy run; rank 0 saves the tokens and each step's logits."""
    import tierstore

    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tierstore.AutoModel.from_pretrained(model_path, budget=tierstore.Budget(vram=vram, ram=ram),
                                             tensor_parallel=world) as model:
        text = model.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                                   add_generation_prompt=True)
        ids = model.tokenizer(text, return_tensors="pt").input_ids.to(model.device)
        result = model.generate(ids, max_new_tokens=tokens, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save({"world": world, "tokens": result.sequences[0, ids.shape[1]:].cpu(),
                        "scores": torch.stack([step[0].float().cpu() for step in result.scores])}, out)


def compare(first_path: str, second_path: str) -> None:
    """Step by step up to the first different token: the largest logit difference and each run's best two."""
    first, second = torch.load(first_path), torch.load(second_path)
    a, b = first["tokens"].tolist(), second["tokens"].tolist()
    parting = first_difference(a, b)
    print(f"N={first['world']} and N={second['world']}: "
          + ("the same tokens" if parting is None else f"the same tokens up to step {parting}"))
    for step in range(len(a) if parting is None else parting + 1):
        best = [scores[step].topk(2) for scores in (first["scores"], second["scores"])]
        largest = float((first["scores"][step] - second["scores"][step]).abs().max())
        print(f"step {step:>2}: took {a[step]:>6} / {b[step]:>6}; largest logit difference {largest:.3f}; best two "
              + " / ".join(f"{t.indices.tolist()} at {[round(v, 3) for v in t.values.tolist()]}" for t in best))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
