"""A file of prompts run in batches: `tierstore generate MODEL --prompts-file in.jsonl --out out.jsonl`.

Each input line is a JSON object with a "prompt" (and, optionally, an "id" carried to the output). Each finished
prompt is appended to the output as one line, with one write, so a killed run leaves whole lines (and at most one
partial last line, dropped on resume); running the same command again skips the prompts already done.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from ...errors import InputError
from .text import check_text


def read_prompts(path: str) -> list[dict[str, Any]]:
    """The prompts of a JSONL file, each {"prompt": str, "id": any}; InputError naming the first bad line."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError as exc:
        raise InputError(f"prompts file {path!r} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"prompts file {path!r} cannot be read: {exc}") from exc
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}, line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise InputError(f"{path}, line {number}: expected an object with a non-empty \"prompt\" string")
        check_text(item["prompt"], f"{path}, line {number}: the prompt")
        prompts.append({"prompt": item["prompt"], "id": item.get("id")})
    if not prompts:
        raise InputError(f"prompts file {path!r} holds no prompts")
    return prompts


def finished(out_path: str, prompts: list[dict[str, Any]]) -> set[int]:
    """Indexes of the prompts `out_path` already holds results for. A partial last line (a killed write) is cut
    off; a result for another prompt than the input's at that index is refused (another run's output)."""
    if not os.path.exists(out_path):
        return set()
    with open(out_path, "rb") as handle:
        data = handle.read()
    whole = data[:data.rfind(b"\n") + 1]
    done = set()
    for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            item = json.loads(line)
            index = item["index"]
            same = isinstance(index, int) and 0 <= index < len(prompts) and item["prompt"] == prompts[index]["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{out_path}, line {number}: not a result line of tierstore ({exc}); use another "
                             f"--out") from exc
        if not same:
            raise InputError(f"{out_path}, line {number}: a result for another prompt than the input's prompt "
                             f"{index + 1 if isinstance(index, int) else repr(index)} (counting prompts from 1); use "
                             f"another --out")
        done.add(index)
    if len(whole) < len(data):
        with open(out_path, "r+b") as handle:  # a killed run's partial line: drop it before appending
            handle.truncate(len(whole))
    return done


def batches(pending: list[int], size: int) -> Iterator[list[int]]:
    """The pending prompt indexes, `size` at a time, in order."""
    for start in range(0, len(pending), size):
        yield pending[start:start + size]


def append_line(fd: int, record: dict[str, Any]) -> None:
    """One result, one write, then fsync: a kill leaves it whole or (at worst) a partial last line."""
    os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())
    os.fsync(fd)


def run_file(prompts: list[dict[str, Any]], done: set[int], out_path: str, batch_size: int,
             generate: Callable[[list[str]], tuple[list[str], list[list[int]]]],
             on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the `prompts` not in `done` through `generate` (texts and token ids for a list of prompts),
    `batch_size` at a time, appending each result to `out_path` as it finishes. Returns counts and timing."""
    pending = [index for index in range(len(prompts)) if index not in done]
    start_s = time.perf_counter()
    tokens = 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for chunk in batches(pending, batch_size):
            texts, token_ids = generate([prompts[index]["prompt"] for index in chunk])
            for index, text, ids in zip(chunk, texts, token_ids):
                append_line(fd, {"index": index, "id": prompts[index]["id"], "prompt": prompts[index]["prompt"],
                                 "text": text, "tokens": ids})
                tokens += len(ids)
            if on_progress is not None:
                on_progress(len(chunk), len(pending))
    finally:
        os.close(fd)
    return {"prompts": len(prompts), "skipped": len(done), "generated": len(pending), "new_tokens": tokens,
            "seconds": time.perf_counter() - start_s}
