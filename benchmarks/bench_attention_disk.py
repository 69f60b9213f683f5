"""Issue 10's GPU rows: flash-attn-4 against SDPA, and the disk bound with the parallel O_DIRECT probe.

One device-tool call, flash-attn-4's wheels installed under /tmp/site first:
    PYTHONPATH=$PWD:/tmp/site python3 benchmarks/bench_attention_disk.py --out $OUT
On the Llama-2-7B-shaped fp16 model (random weights, bench_7b's):
- attention: sdpa and flash_attention_4 at vram 4GB / ram 16GB: the greedy tokens of 16 new tokens (equal count),
  decode s/token, and the prefill of a 4000-token prompt (the context is 4096);
- disk: at vram 4GB / ram 4GB most layers are read from disk each pass; decode s/token against the plan's
  prediction from the probe (4 readers, 200 MiB units, O_DIRECT), with the page cache dropped where allowed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

from common import build_checkpoint, prompt_ids


def drop_page_cache() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def run(path: str, attention: str, vram: str, ram: str, cache: str, tokens: int, long_prompt: int | None) -> dict:
    import torch

    import tierstore

    config = {"runtime": {"cache_dir": cache, "attention": attention}}
    row: dict = {"attention": attention, "vram": vram, "ram": ram}
    with tierstore.AutoModel.from_pretrained(path, budget=tierstore.Budget(vram=vram, ram=ram), config=config,
                                             dtype=torch.float16) as model:
        ids = prompt_ids(1)
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        report = model.report().to_dict()
        row.update(tokens=out[0, ids.shape[1]:].tolist(), decode_s_per_token=report["timing"]["decode_step_s"],
                   predicted_s=report["timing"]["predicted_step_s"], bound=report["plan"]["predicted"]["bound"],
                   regime=report["plan"]["regime"], read_mode=[n for n in report["plan"]["notes"]
                                                              if n.startswith("disk reads")])
        if long_prompt:
            long_ids = torch.randint(100, 32000, (1, long_prompt), generator=torch.Generator().manual_seed(2))
            for name in ("prefill_long_first_s", "prefill_long_s"):  # the first may compile kernels
                torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(long_ids, max_new_tokens=1, do_sample=False)
                torch.cuda.synchronize()
                row[name] = time.perf_counter() - start
    print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/bench-attention")
    parser.add_argument("--work", default="/tmp")
    parser.add_argument("--skip-disk", action="store_true", help="only the attention rows")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    from tierstore.probe import run_probe

    cache = os.path.join(args.work, "attn-cache")
    probe = run_probe(cache, torch.device("cuda", 0), disk_nbytes=4 * 2**30)
    print(f"probe: disk {probe['disk_gbps']:.2f} GB/s (4 readers, 200 MiB units, O_DIRECT), pinned h2d "
          f"{probe['h2d_pinned_gbps']:.2f} GB/s; {torch.cuda.get_device_name(0)}", flush=True)
    path = os.path.join(args.work, "llama7b-hf")
    build_checkpoint(path)
    rows = []
    for attention in ("sdpa", "flash_attention_4"):
        try:
            rows.append(run(path, attention, "4GB", "16GB", cache, 16, 4000))
        except Exception as exc:  # noqa: BLE001 - report and go on to the disk rows
            print(f"{attention}: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"attention": attention, "error": f"{type(exc).__name__}: {exc}"})
    if len(rows) == 2 and "tokens" in rows[0] and "tokens" in rows[1]:
        same = sum(a == b for a, b in zip(rows[0]["tokens"], rows[1]["tokens"]))
        print(f"flash_attention_4 vs sdpa: {same}/{len(rows[0]['tokens'])} greedy tokens equal", flush=True)
    dropped = None
    if args.skip_disk:
        with open(os.path.join(args.out, "bench_attention_disk.json"), "w") as handle:
            json.dump({"probe": probe, "rows": rows}, handle, indent=1)
        return
    dropped = drop_page_cache()
    print(f"page cache dropped: {dropped}", flush=True)
    rows.append(run(path, "sdpa", "4GB", "4GB", cache, 6, None))
    disk = rows[-1]
    print(f"disk-bound run: {disk['decode_s_per_token']:.3f} s/token, predicted {disk['predicted_s']:.3f} "
          f"({disk['bound']}), achieved/predicted {disk['decode_s_per_token'] / disk['predicted_s']:.3f}", flush=True)
    with open(os.path.join(args.out, "bench_attention_disk.json"), "w") as handle:
        json.dump({"probe": probe, "rows": rows, "page_cache_dropped": dropped}, handle, indent=1)


if __name__ == "__main__":
    main()
