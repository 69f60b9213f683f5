"""One generate request from prompts to text, tokens and report: what the CLI's `generate` runs."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ...budget import Budget
from ...errors import InputError
from ..decoding.sampling import generate_kwargs
from .text import check_text

DEFAULT_FILE_BATCH = 8  # prompts per pass from a prompts file


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """Prompts and settings of one run."""

    model: str
    prompts: list[str]
    max_new_tokens: int = 32
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    chat_template: bool = True
    budget: Budget | None = None
    config: Any = None
    trust_remote_code: bool = False
    allow_download: bool = False
    draft: str | None = None
    trace: str | None = None
    dtype: str | None = None
    tensor_parallel: int = 1


def encode_prompts(tokenizer: Any, prompts: list[str], chat_template: bool) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, left-padded, with the chat template for instruct models."""
    if tokenizer is None:
        raise InputError("this model ships no tokenizer; call model.generate with token ids")
    for index, prompt in enumerate(prompts):
        if not prompt.strip():
            raise InputError(f"prompt {index + 1} is empty")
    if chat_template and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = list(prompts)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat_template)


def check_request(request: GenerateRequest) -> None:
    """Refuse settings generate cannot honour and prompts that are not text, naming the option."""
    for index, prompt in enumerate(request.prompts, start=1):
        check_text(prompt, f"--prompt {index}" if len(request.prompts) > 1 else "--prompt")
    if request.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {request.max_new_tokens}")
    if request.temperature is not None and not request.temperature > 0:
        raise InputError(f"--temperature must be > 0, got {request.temperature}")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {request.top_p}")
    if request.top_k is not None and request.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {request.top_k}")
    if (request.top_p is not None or request.top_k is not None) and request.temperature is None:
        raise InputError("--top-p and --top-k apply when sampling: give --temperature too")


def open_model(request: GenerateRequest) -> Any:
    """The request's model, opened (a TierstoreModel; close it, or use it in a `with`)."""
    from ..compose import AutoModel

    return AutoModel.from_pretrained(request.model, budget=request.budget, config=request.config,
                                     trust_remote_code=request.trust_remote_code,
                                     allow_download=request.allow_download, progress=True, draft=request.draft,
                                     trace=request.trace, dtype=request.dtype,
                                     tensor_parallel=request.tensor_parallel)


def sampling(request: GenerateRequest) -> tuple[dict[str, Any], int | None]:
    """generate's decoding arguments, and the seed drawn or given when sampling (torch's generator seeded with it)."""
    return generate_kwargs(request.temperature, request.top_p, request.top_k, request.seed)


def generate_batch(model: Any, prompts: list[str], request: GenerateRequest, decoding: dict[str, Any],
                   streamer: Any = None) -> tuple[list[str], list[list[int]]]:
    """Texts and new token ids for `prompts`, one left-padded batch; each sequence ends at its end-of-text."""
    inputs = encode_prompts(model.tokenizer, prompts, request.chat_template)
    out = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         max_new_tokens=request.max_new_tokens, pad_token_id=model.tokenizer.pad_token_id,
                         streamer=streamer, **decoding)
    eos = model.tokenizer.eos_token_id
    tokens = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        tokens.append(row[:row.index(eos) + 1] if eos in row else row)
    return model.tokenizer.batch_decode(tokens, skip_special_tokens=True), tokens


def run_generate(request: GenerateRequest, on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate for every prompt in one batch; returns tokens, text, the report and its dict."""
    from transformers import TextStreamer

    check_request(request)
    if not request.prompts or any(not p.strip() for p in request.prompts):
        raise InputError("empty prompt: give some text with --prompt")
    with open_model(request) as model:
        decoding, seed = sampling(request)
        streamer = None
        if on_text is not None:
            streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
            streamer.on_finalized_text = lambda text, stream_end=False: on_text(text)  # type: ignore[method-assign]
        texts, tokens = generate_batch(model, request.prompts, request, decoding, streamer)
        report = model.report()
        if seed is not None:
            report.notes.append(f"sampled with seed {seed} (--seed {seed} repeats this run)")
    return {"tokens": tokens, "text": texts, "report": report, **report.to_dict()}


def run_prompts_file(request: GenerateRequest, prompts_path: str, out_path: str, batch_size: int | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Every prompt of `prompts_path` not yet in `out_path`, `batch_size` at a time (default 8; 1 with a draft,
    which speculates for one sequence), see batchfile.py. The input is read and the output checked before the
    model is opened, which is not opened at all when every prompt is done. Returns counts, timing and the report
    of the last batch (None when nothing ran)."""
    from ...files import check_writable
    from .batchfile import finished, read_prompts, run_file

    check_request(request)
    batch_size = batch_size if batch_size is not None else (1 if request.draft else DEFAULT_FILE_BATCH)
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    check_writable(out_path, "--out file")
    prompts = read_prompts(prompts_path)  # bad input is refused before anything is converted or read
    done = finished(out_path, prompts)
    if len(done) == len(prompts):  # nothing left: the model is not opened
        return {"prompts": len(prompts), "skipped": len(done), "generated": 0, "new_tokens": 0, "seconds": 0.0,
                "batch_size": batch_size, "report": None}
    with open_model(request) as model:
        decoding, seed = sampling(request)
        summary = run_file(prompts, done, out_path, batch_size,
                           lambda batch: generate_batch(model, batch, request, decoding), on_progress)
        report = model.report()
        report.notes.append(f"these tables cover the last batch ({report.timing.batch_size} prompts) of "
                            f"{summary['generated']}; the summary line covers them all")
        if seed is not None:
            report.notes.append(f"sampled with seed {seed} (--seed {seed} repeats this run's sampling)")
    return {**summary, "batch_size": batch_size, "report": report}
