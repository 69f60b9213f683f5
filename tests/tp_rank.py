"""One rank of a tensor-parallel run, started by torchrun from tests/test_tensor_parallel.py: opens MODEL with
tensor_parallel = WORLD_SIZE (and the config sections in the optional JSON argument after the cache directory),
and rank 0 saves the greedy tokens and the prompt's logits to OUT."""
import json
import os
import sys

import torch

import tierstore

model_dir, out, prompt, new_tokens, cache = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5]
sections = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
with tierstore.AutoModel.from_pretrained(model_dir, config={**sections, "runtime": {"cache_dir": cache}},
                                         tensor_parallel=int(os.environ["WORLD_SIZE"])) as model:
    ids = torch.tensor([prompt])
    tokens = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    logits = model(ids).logits
if os.environ["RANK"] == "0":
    torch.save({"tokens": tokens, "logits": logits}, out)
