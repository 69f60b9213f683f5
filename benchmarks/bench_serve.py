"""Load a running `tierstore serve`: a fixed number of streamed chat requests from a fixed number of concurrent
clients, within a time limit. Prints requests/s, aggregate tokens/s, and p50/p99 of the request latency and of the
time per output token; `--json` prints the same as one JSON line.

    tierstore serve smollm2 --port 8000 &
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000/v1 --model smollm2 --requests 64 --concurrency 64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from common import PROMPTS, load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="the model id the server serves")
    parser.add_argument("--api-key")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds for the whole load")
    parser.add_argument("--completions", action="store_true", help="text completions (a model with no chat "
                                                                       "template)")
    parser.add_argument("--prompt", action="append", help="the prompts to cycle through (default: eight questions)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    try:
        result = asyncio.run(load(args.url, args.model, args.requests, args.concurrency, args.max_tokens,
                                  args.api_key, args.time_limit, not args.completions, args.prompt or PROMPTS))
    except asyncio.TimeoutError:
        print(f"bench_serve: the load did not finish within --time-limit {args.time_limit} s", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>16}  {value:.4g}" if isinstance(value, float) else f"{name:>16}  {value}")
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
