"""What the CPU gets computing routed experts, and why a verify pass sees a tenth of the probe's rate.

The upcycled MoE's experts (Mixtral's, hidden 1152, intermediate 1536, bf16: 10.6 MB each), computed by
`host_experts.host_outputs` exactly as a layer call does, from 48 experts (510 MB, more than the CPU's caches) in
RAM, for 1 to 64 tokens an expert. Reported as weight bytes per second (what the cost model calls the CPU's rate)
and as GFLOP/s, alone and while the link copies pinned RAM to the GPU (a verify pass's copies read the same RAM
the CPU's experts do). Also the probe's own figure (`probe.cpu_linear_gbps`, 1 and 32 tokens) and the CPU's
features that decide torch's bf16 kernels.

    python benchmarks/cpu_expert_rate.py            # a GPU for the copy rows; the others run anywhere
"""
import argparse
import threading
import time
from pathlib import Path

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import tierstore  # noqa: F401  (maps the checkout's packages)
from tierstore.inference.runtime.host_experts import host_outputs
from tierstore.probe import cpu_linear_gbps

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 1152, 1536, 48, 8


def cpu_features() -> str:
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f"{name}={'yes' if name in flags else 'no'}" for name in wanted)


def experts_module() -> MixtralExperts:
    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS)
    module = MixtralExperts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, 0.02)
        module.down_proj.normal_(0, 0.02)
    return module.to(torch.bfloat16)


def routing(tokens_each: int, experts: int, top_k: int) -> tuple[int, list[int]]:
    """(tokens, routed experts in token order) of one layer call where each token goes to `top_k` distinct experts of
    `experts` and each expert gets `tokens_each` tokens (at least one token)."""
    tokens = max(1, tokens_each * experts // top_k)
    return tokens, [(token * top_k + rank) % experts for token in range(tokens) for rank in range(top_k)]


def rate(module: MixtralExperts, tokens_each: int, repeats: int = 3) -> tuple[float, float]:
    """(weight GB/s, GFLOP/s) of every expert computed for `tokens_each` tokens, as one layer call."""
    tokens, routed = routing(tokens_each, EXPERTS, TOP_K)
    hidden = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16)
    routing_weights = torch.full((tokens, TOP_K), 1 / TOP_K)
    weights = [{"gate_up_proj": module.gate_up_proj[e], "down_proj": module.down_proj[e]} for e in range(EXPERTS)]
    experts = list(range(EXPERTS))
    host_outputs(module, experts, weights, routed, TOP_K, hidden, routing_weights)  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        host_outputs(module, experts, weights, routed, TOP_K, hidden, routing_weights)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    weight_bytes = EXPERTS * 3 * HIDDEN * INTERMEDIATE * 2
    flops = 2 * 3 * HIDDEN * INTERMEDIATE * tokens_each * EXPERTS
    return weight_bytes / seconds / 1e9, flops / seconds / 1e9


class LinkLoad:
    """Pinned RAM copied to the GPU over and over on a side stream, as a verify pass's expert copies do."""

    def __init__(self, nbytes: int = 1 << 30, blocking: bool = False) -> None:
        """`blocking`: the copying thread waits on an event made with cudaEventBlockingSync (it sleeps) instead of
        the stream's synchronize (by default CUDA spins a core while the host waits)."""
        self.source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.target = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()
        self.blocking = blocking
        self.copied = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with torch.cuda.stream(self.stream):
            while not self._stop.is_set():
                self.target.copy_(self.source, non_blocking=True)
                if self.blocking:
                    done = torch.cuda.Event(blocking=True)
                    done.record(self.stream)
                    done.synchronize()
                else:
                    self.stream.synchronize()
                self.copied += self.source.numel()

    def __enter__(self) -> "LinkLoad":
        self.start_s = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.gbps = self.copied / (time.perf_counter() - self.start_s) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64", help="tokens an expert, comma-separated")
    parser.add_argument("--skip-table", action="store_true", help="only the rows under load by waits and threads")
    args = parser.parse_args()
    counts = [int(t) for t in args.tokens.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {cpu_features()}")
    print(f"probe cpu_linear_gbps: 1 token {cpu_linear_gbps(1, torch.bfloat16):.1f} GB/s, "
          f"32 tokens {cpu_linear_gbps(32, torch.bfloat16):.1f} GB/s")
    module = experts_module()
    print("| tokens an expert | GB/s | GFLOP/s | with the link copying: GB/s | GFLOP/s | link GB/s meanwhile |")
    print("|---|---|---|---|---|---|")
    for count in [] if args.skip_table else counts:
        gbps, gflops = rate(module, count)
        row = f"| {count} | {gbps:.1f} | {gflops:.0f} |"
        if torch.cuda.is_available():
            with LinkLoad() as link:
                loaded_gbps, loaded_gflops = rate(module, count)
            row += f" {loaded_gbps:.1f} | {loaded_gflops:.0f} | {link.gbps:.1f} |"
        else:
            row += " - | - | - |"
        print(row, flush=True)
    if torch.cuda.is_available():
        cores = torch.get_num_threads()
        print("\nWith the link copying, by how the copying thread waits and the CPU threads the experts use:")
        print("| tokens an expert | waits | threads | GB/s | GFLOP/s | link GB/s |")
        print("|---|---|---|---|---|---|")
        for count in (1, 8, 64):
            for blocking, threads in ((False, cores), (True, cores), (False, cores - 1), (False, cores - 2)):
                torch.set_num_threads(threads)
                with LinkLoad(blocking=blocking) as link:
                    gbps, gflops = rate(module, count)
                print(f"| {count} | {'blocking event' if blocking else 'spin'} | {threads} | {gbps:.1f} | "
                      f"{gflops:.0f} | {link.gbps:.1f} |", flush=True)
        torch.set_num_threads(cores)
    for threads in (1, 4, 8):
        if threads < torch.get_num_threads():
            torch.set_num_threads(threads)
            gbps, gflops = rate(module, 1)
            many_gbps, many_gflops = rate(module, 16)
            print(f"{threads} threads: 1 token {gbps:.1f} GB/s, 16 tokens {many_gbps:.1f} GB/s ({many_gflops:.0f} "
                  f"GFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
