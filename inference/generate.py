"""One generate request from prompts to text, tokens and report: what the CLI's `generate` runs."""
from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from typing import Any

import torch

from ..budget import Budget
from ..errors import InputError


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


def run_generate(request: GenerateRequest, on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate for every prompt in one batch; returns tokens, text, the report and its dict."""
    from transformers import TextStreamer

    from .auto import AutoModel

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
    if not request.prompts or any(not p.strip() for p in request.prompts):
        raise InputError("empty prompt: give some text with --prompt")
    with AutoModel.from_pretrained(request.model, budget=request.budget, config=request.config,
                                   trust_remote_code=request.trust_remote_code,
                                   allow_download=request.allow_download, progress=True,
                                   draft=request.draft, trace=request.trace, dtype=request.dtype) as model:
        inputs = encode_prompts(model.tokenizer, request.prompts, request.chat_template)
        kwargs: dict[str, Any] = {"max_new_tokens": request.max_new_tokens,
                                  "attention_mask": inputs["attention_mask"],
                                  "pad_token_id": model.tokenizer.pad_token_id}
        if request.temperature is None:
            kwargs["do_sample"] = False
        else:
            seed = request.seed if request.seed is not None else secrets.randbits(31)
            torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p or 1.0,
                          top_k=request.top_k or 0)
        if on_text is not None:
            streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
            streamer.on_finalized_text = lambda text, stream_end=False: on_text(text)  # type: ignore[method-assign]
            kwargs["streamer"] = streamer
        out = model.generate(inputs["input_ids"], **kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1]:].tolist()
        report = model.report()
        if request.temperature is not None:
            report.notes.append(f"sampled with seed {seed} (--seed {seed} repeats this run)")
    return {"tokens": new_tokens,
            "text": model.tokenizer.batch_decode(new_tokens, skip_special_tokens=True),
            "report": report, **report.to_dict()}
