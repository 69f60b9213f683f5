"""Device memory the CUDA allocator still holds after giving its cache back, with a streamed verifier's KV cache
cut to the accepted path as 60 separate tensors (`tree.keep_positions`) or as views of one buffer (the twelfth
session's cut, kept here to compare: the fourteenth measured it holding more, and went back), under the churn of
verify passes on the upcycled MoE's shapes: 30 layers of 6 key-value heads of 64, each pass's keys and values
appended per layer, the experts kernel's transient buffers, trees of 9 to 1,025 nodes, up to 60 accepted a pass.
A GPU only; no model needed (seconds).

    python benchmarks/kv_cut_pages.py
"""
import random

import torch
from transformers import DynamicCache

import tierstore  # noqa: F401  (maps the checkout's packages)
from tierstore.inference.decoding.tree import keep_positions
from tierstore.inference.devices import expandable_segments

expandable_segments()  # as tierstore runs


def old_keep(cache, keep_from, positions):
    """The cut as it was: each layer's keys and values their own new tensors."""
    for layer in cache.layers:
        index = torch.tensor(positions, dtype=torch.long, device=layer.keys.device)
        layer.keys = torch.cat([layer.keys[..., :keep_from, :], layer.keys.index_select(-2, index)], dim=-2)
        layer.values = torch.cat([layer.values[..., :keep_from, :], layer.values.index_select(-2, index)], dim=-2)


def one_buffer_keep(cache, keep_from, positions):
    """The twelfth session's cut: every layer's kept keys and values views of one new buffer."""
    import math

    tensors = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
    index = torch.tensor([*range(keep_from), *positions], dtype=torch.long, device=tensors[0].device)
    shapes = [(*tensor.shape[:-2], len(index), tensor.shape[-1]) for tensor in tensors]
    sizes = [math.prod(shape) for shape in shapes]
    buffer = torch.empty(sum(sizes), dtype=tensors[0].dtype, device=tensors[0].device)
    kept = [view.view(shape) for view, shape in zip(buffer.split(sizes), shapes)]
    for tensor, out in zip(tensors, kept):
        torch.index_select(tensor, -2, index, out=out)
    for layer, keys, values in zip(cache.layers, kept[::2], kept[1::2]):
        layer.keys, layer.values = keys, values


def run(cut, seed):
    rng = random.Random(seed)
    torch.cuda.empty_cache()
    dev = "cuda"
    base = torch.cuda.memory_allocated()
    cache = DynamicCache()
    prefix = 45
    for layer in range(30):
        cache.update(torch.randn(1, 6, prefix, 64, dtype=torch.bfloat16, device=dev),
                     torch.randn(1, 6, prefix, 64, dtype=torch.bfloat16, device=dev), layer)
    stuck = []
    for _ in range(24):
        nodes = rng.choice([9, 39, 51, 95, 184, 333, 392, 861, 1025])
        for layer in range(30):
            hidden = torch.randn(nodes, 1152, dtype=torch.bfloat16, device=dev)
            cache.update(torch.randn(1, 6, nodes, 64, dtype=torch.bfloat16, device=dev),
                         torch.randn(1, 6, nodes, 64, dtype=torch.bfloat16, device=dev), layer)
            gate_up = torch.empty(nodes * 8, 3072, dtype=torch.bfloat16, device=dev)
            down = torch.empty(nodes * 8, 1152, dtype=torch.bfloat16, device=dev)
            table = torch.zeros(2, 128, dtype=torch.long, device=dev)
            del gate_up, down, table, hidden
        accepted = min(nodes - 1, rng.randint(1, 60))
        positions = [prefix + node for node in range(1, accepted + 1)]
        cut(cache, prefix, positions)
        prefix += accepted
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        stuck.append((torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 1e6)
    kv = (torch.cuda.memory_allocated() - base) / 1e6
    del cache
    torch.cuda.empty_cache()
    return kv, stuck


print(torch.cuda.get_device_name(0))
for seed in (0, 1):
    for name, cut in (("old: 60 tensors", old_keep), ("one buffer", one_buffer_keep),
                      ("keep_positions (tensors of their own)", keep_positions)):
        kv, stuck = run(cut, seed)
        print(f"seed {seed} {name}: KV {kv:.1f} MB; held beyond allocated after each give-back: "
              f"max {max(stuck):.1f} MB, mean {sum(stuck) / len(stuck):.1f} MB, last {stuck[-1]:.1f} MB", flush=True)
