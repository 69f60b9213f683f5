"""Llama-3.1-405B shape on N GPUs of one host: tensor parallelism over nf4 shards that each rank writes for itself,
with random weights made on its own GPU (no disk here holds the whole model: 0.81 TB in bf16, 0.23 TB in nf4).

One device-tool call on nvidia-h200-x4 (512 GiB RAM, 235 GB disk):
    python benchmarks/bench_405b.py --out $OUT
Steps, each timed:
1. config.json of Llama-3.1-405B (bf16, 126 layers, hidden 16384, 128 query and 8 key-value heads, MLP 53248,
   vocabulary 128256) and a word-level tokenizer, in a directory with no weights (`--model`);
2. N writer processes, one per GPU, at once: rank R draws each unit's whole tensors on GPU R, keeps its part and
   quantizes it there (`write_store(..., shard=Group(R, N))`) into the store a `--tp N` run reads (`--store`; by
   default /dev/shm, since N shards of nf4-64 take about 234 GB, more than the disk has free). A finished store is
   kept; a killed write resumes;
3. `tierstore generate MODEL --tp N` at `--vram`/`--ram` per rank: s/token (the report's median decode step)
   against the link bound, host->device bytes per link per pass over the pinned GB/s one link reaches while all N
   copy at once; peak VRAM per GPU (NVML, sampled every 0.2 s) and peak RSS per rank (each rank process's VmHWM at
   its end is not visible to the parent, so RSS is sampled too), and the set-up time to the first token.
Prints RESULT lines (JSON) and one table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from bench_tp import concurrent_pinned_gbps
from common import prompt_text, word_tokenizer

LLAMA_405B = dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                  rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16")


def write_config(model_dir: str, layers: int | None) -> None:
    """The bare model directory: config.json and a tokenizer, no weights (kept if there)."""
    from transformers import LlamaConfig

    if os.path.isfile(os.path.join(model_dir, "config.json")):
        return
    shape = dict(LLAMA_405B, num_hidden_layers=layers or LLAMA_405B["num_hidden_layers"])
    LlamaConfig(**shape).save_pretrained(model_dir)
    word_tokenizer(shape["vocab_size"]).save_pretrained(model_dir)


def toml(args: argparse.Namespace) -> str:
    path = os.path.join(args.out, "405b.toml")
    with open(path, "w") as handle:
        handle.write(f'[runtime]\ncache_dir = "{args.store}"\n'
                     f'[compression]\nformat = "nf4"\nblocksize = {args.blocksize}\n')
    return path


def write_rank(model_dir: str, config_path: str, rank: int, world: int) -> None:
    """This process's rank's nf4 shard store, its weights drawn on this process's GPU (CUDA_VISIBLE_DEVICES)."""
    import torch
    from tierstore.inference.loading.resolve import resolve
    from tierstore.inference.loading.shards import rank_store_dir
    from tierstore.inference.loading.skeleton import build_skeleton
    from tierstore.inference.loading.splits import Group
    from tierstore.inference.loading.store_writer import parameter_shapes, write_store
    from transformers import AutoConfig

    from tierstore.compression import Codec
    from tierstore.config import Config

    cfg = Config.load(config_path)
    config = AutoConfig.from_pretrained(model_dir)
    shapes = parameter_shapes(build_skeleton(config, torch.bfloat16))
    gen = torch.Generator("cuda").manual_seed(rank)

    def unit_tensors(key: str, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in names:
            shape = shapes[name][1]
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16, device="cuda")
            else:  # whole tensors on the GPU; write_store keeps the rank's part (ranks draw different ones)
                tensors[name] = torch.randn(shape, generator=gen, dtype=torch.bfloat16, device="cuda") * 0.02
        return tensors

    out_dir = rank_store_dir(resolve(model_dir, weights=False), cfg, torch.bfloat16, Group(rank, world))
    write_store(out_dir, config, unit_tensors, torch.bfloat16, codec=Codec.wanted(cfg.compression), device="cuda",
                progress=rank == 0, shard=Group(rank, world))


class Peaks:
    """Peak device memory per GPU (NVML) and peak RSS per process under a parent, sampled while a run lasts."""

    def __init__(self, gpus: int, parent: int) -> None:
        import psutil
        import pynvml

        pynvml.nvmlInit()
        self._nvml, self._psutil = pynvml, psutil
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(gpus)]
        self.vram = [0] * gpus
        self.rss: dict[int, int] = {}
        self._parent = psutil.Process(parent)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for index, handle in enumerate(self._handles):
                self.vram[index] = max(self.vram[index], self._nvml.nvmlDeviceGetMemoryInfo(handle).used)
            try:
                children = self._parent.children(recursive=True)
            except self._psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    self.rss[child.pid] = max(self.rss.get(child.pid, 0), child.memory_info().rss)
                except self._psutil.NoSuchProcess:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(args: argparse.Namespace, config_path: str) -> dict:
    """`tierstore generate --tp N` over the bare model: its report, peaks and wall time."""
    report = os.path.join(args.out, f"405b-tp{args.ranks}.json")
    command = [sys.executable, "-m", "tierstore", "generate", args.model, "--prompt", prompt_text(),
               "--no-chat-template", "--max-new-tokens", str(args.tokens), "--vram", args.vram, "--ram", args.ram,
               "--config", config_path, "--report-json", report, "--tp", str(args.ranks)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = Peaks(args.ranks, proc.pid)
    out, err = proc.communicate()
    peaks.stop()
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    with open(report) as handle:
        data = json.load(handle)
    return {"s_per_token": data["timing"]["decode_step_s"], "setup_s": data.get("setup_s"),
            "h2d_bytes_per_pass": data["plan"]["h2d_bytes_per_pass"],
            "disk_bytes_per_pass": data["plan"]["disk_bytes_per_pass"], "wall_s": wall_s,
            "peak_vram_gb": [round(b / 1e9, 2) for b in peaks.vram],
            "peak_rss_gb": sorted((round(b / 1e9, 2) for b in peaks.rss.values()), reverse=True)[:args.ranks],
            "stdout_tail": out[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/llama405b-config")
    parser.add_argument("--store", default="/dev/shm/tierstore-405b", help="cache directory of the rank stores")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--blocksize", type=int, default=64, help="nf4 block size (256: 4.125 bits, 7%% fewer bytes)")
    parser.add_argument("--layers", type=int, help="fewer layers than 126 (a smaller trial of the same width)")
    parser.add_argument("--vram", default="8GB", help="per GPU")
    parser.add_argument("--ram", default="40GB", help="per rank")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default=".")
    parser.add_argument("--write-rank", type=int, help=argparse.SUPPRESS)  # a writer process
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    config_path = toml(args)
    if args.write_rank is not None:
        write_rank(args.model, config_path, args.write_rank, args.ranks)
        return
    write_config(args.model, args.layers)
    start = time.perf_counter()
    writers = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--write-rank", str(rank)],
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": str(rank)}) for rank in range(args.ranks)]
    if any(writer.wait() for writer in writers):
        sys.exit("a writer failed; run again to resume")
    write_s = time.perf_counter() - start
    link = concurrent_pinned_gbps(args.ranks)
    result = run(args, config_path)
    result.update(ranks=args.ranks, write_s=write_s, link_gbps=link, blocksize=args.blocksize)
    if "error" not in result:
        result["link_bound_s"] = result["h2d_bytes_per_pass"] / (link * 1e9)
    print("RESULT " + json.dumps(result), flush=True)
    if "error" in result:
        sys.exit(f"run failed: {result['error']}")
    print(f"{'N':>2} {'s/token':>8} {'GB/link/pass':>12} {'disk GB/pass':>12} {'link GB/s':>9} {'link bound':>10} "
          f"{'x bound':>7} {'set-up s':>8} {'write s':>7}")
    print(f"{args.ranks:>2} {result['s_per_token']:>8.3f} {result['h2d_bytes_per_pass'] / 1e9:>12.2f} "
          f"{result['disk_bytes_per_pass'] / 1e9:>12.2f} {link:>9.1f} {result['link_bound_s']:>10.3f} "
          f"{result['s_per_token'] / result['link_bound_s']:>7.2f} {result['setup_s'] or float('nan'):>8.1f} "
          f"{write_s:>7.0f}")
    print("peak VRAM per GPU (GB):", result["peak_vram_gb"], " peak RSS per rank (GB):", result["peak_rss_gb"])


if __name__ == "__main__":
    main()
