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
import statistics
import sys
import time

import httpx

PROMPTS = ["Tell me about the sea.", "What is the capital of France?", "Write a haiku about autumn.",
           "Explain gravity in one sentence.", "List three colors.", "What is 12 times 12?",
           "Describe a cat.", "Why is the sky blue?"]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      chat: bool) -> dict:
    """One streamed completion (chat, or text for a model without a chat template): its latency, time to first
    token, and completion tokens."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/{'chat/completions' if chat else 'completions'}", json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 500}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and (chunk["choices"][0]["delta"].get("content") if chat
                                                         else chunk["choices"][0]["text"]):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"status": 200, "latency_s": end - start, "first_s": first - start, "tokens": tokens,
            "per_token_s": (end - first) / max(tokens - 1, 1)}


async def load(url: str, model: str, requests: int, concurrency: int, max_tokens: int, api_key: str | None,
               time_limit_s: float, chat: bool = True, prompts: list[str] = PROMPTS) -> dict:
    """`requests` requests, `concurrency` at a time; raises TimeoutError past `time_limit_s`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)

    async def run(index: int, client: httpx.AsyncClient) -> dict:
        async with gate:
            return await one_request(client, url, model, prompts[index % len(prompts)], max_tokens, chat)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=time_limit_s, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(run(i, client) for i in range(requests))), time_limit_s)
        wall_s = time.perf_counter() - start
    done = [r for r in results if r["status"] == 200]
    latency = sorted(r["latency_s"] for r in done)
    per_token = sorted(r["per_token_s"] for r in done)
    tokens = sum(r["tokens"] for r in done)
    return {"requests": requests, "concurrency": concurrency, "ok": len(done),
            "failed": len(results) - len(done), "wall_s": wall_s, "requests_per_s": len(done) / wall_s,
            "tokens": tokens, "tokens_per_s": tokens / wall_s,
            "latency_p50_s": _percentile(latency, 50), "latency_p99_s": _percentile(latency, 99),
            "per_token_p50_s": _percentile(per_token, 50), "per_token_p99_s": _percentile(per_token, 99)}


def _percentile(values: list[float], percent: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(percent) - 1]


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
