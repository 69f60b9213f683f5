"""What a compression format costs in accuracy, measured: `tierstore eval`.

The uncompressed model reads a text teacher-forced, in windows of `window_tokens`, and its next-token
distributions are kept (float32 log-probabilities, one file per window, under the cache directory: a 128k-token
vocabulary makes them far larger than the text). Each format's model then reads the same windows, and every
position is compared with the reference: top-1 agreement (the same most likely token), the KL divergence of the
format's distribution from the reference's (mean and 99th percentile, nats) and both perplexities on the text's own
next tokens, as llama.cpp's `perplexity --kl-divergence` reports them. Each model is opened under the budget in
turn, so this works for any model tierstore can run, streamed.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any

import torch

from ...budget import Budget
from ...compression import GGML, bits_per_weight
from ...errors import InputError
from .text import check_text

DEFAULT_WINDOW_TOKENS = 512  # tokens per teacher-forced pass: the logits of a 128k vocabulary stay ~256 MB
BUNDLED_TEXT = "eval_text.txt"  # English prose of several kinds and some Python, written for tierstore


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One model measured against the reference: a label for the table, what to open and the config to open it
    with (the reference's model with another compression.format, or a store already compressed)."""

    label: str
    model: str
    config: Any


@dataclasses.dataclass(frozen=True)
class QualityRequest:
    """The reference model, the candidates and the text (None: the bundled one)."""

    model: str
    candidates: Sequence[Candidate]
    config: Any
    text_path: str | None = None
    budget: Budget | None = None
    window_tokens: int = DEFAULT_WINDOW_TOKENS
    max_tokens: int | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    allow_download: bool = False


def bundled_text() -> str:
    """The text `tierstore eval` reads when given none."""
    return resources.files("tierstore").joinpath("data", BUNDLED_TEXT).read_text(encoding="utf-8")


def read_text(path: str | None) -> str:
    """The user's text file (or the bundled text), refused in one line when it is missing, empty or not UTF-8."""
    if path is None:
        return bundled_text()
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise InputError(f"--text {path!r}: {exc.strerror or exc}") from None
    text = raw.decode("utf-8", errors="surrogateescape")
    check_text(text, f"--text {path!r}")
    if not text.strip():
        raise InputError(f"--text {path!r} is empty")
    return text


def windows(ids: torch.Tensor, window_tokens: int) -> list[torch.Tensor]:
    """`ids` (1-D) cut into consecutive windows of at most `window_tokens`; a last window of one token predicts
    nothing and is dropped."""
    parts = [ids[start:start + window_tokens] for start in range(0, ids.numel(), window_tokens)]
    return [part for part in parts if part.numel() > 1]


@dataclasses.dataclass
class Agreement:
    """Running sums over every predicted position of every window."""

    positions: int = 0
    same_top1: int = 0
    nll_reference: float = 0.0
    nll: float = 0.0
    kl: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def add(self, reference: torch.Tensor, logprobs: torch.Tensor, targets: torch.Tensor) -> None:
        """One window: both models' log-probabilities [positions, vocab] (float32) and the text's next tokens."""
        self.positions += targets.numel()
        self.same_top1 += int((reference.argmax(-1) == logprobs.argmax(-1)).sum())
        self.nll_reference -= float(reference.gather(1, targets[:, None]).sum())
        self.nll -= float(logprobs.gather(1, targets[:, None]).sum())
        self.kl.append((reference.exp() * (reference - logprobs)).sum(-1).clamp_min(0))

    def summary(self) -> dict[str, float | int]:
        kl = torch.cat(self.kl)
        reference_ppl = math.exp(self.nll_reference / self.positions)
        ppl = math.exp(self.nll / self.positions)
        return {"tokens": self.positions, "top1_agreement": self.same_top1 / self.positions,
                "kl_mean": float(kl.mean()), "kl_p99": float(torch.quantile(kl, 0.99)),
                "perplexity": ppl, "reference_perplexity": reference_ppl,
                "perplexity_change": ppl / reference_ppl - 1}


def measure_quality(request: QualityRequest, on_progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The reference's perplexity and each candidate's agreement with it, as a dict (see `Agreement.summary`;
    bits per weight of the compressed matrices where a candidate is compressed)."""
    if request.window_tokens < 2:
        raise InputError(f"--window must be at least 2 tokens, got {request.window_tokens}")
    if request.max_tokens is not None and request.max_tokens < 2:
        raise InputError(f"--max-tokens must be at least 2, got {request.max_tokens}")
    text = read_text(request.text_path)
    with tempfile.TemporaryDirectory(prefix="eval-", dir=_scratch_dir(request.config)) as scratch:
        with _open(request, request.model, request.config.with_compression("none")) as reference:
            if reference.decompressor is not None and reference.decompressor.codec.format != GGML:
                raise InputError(f"{request.model} is stored compressed ({reference.decompressor.codec.name}); "
                                 f"eval measures formats against the uncompressed model: give that one")
            parts = _tokenize(reference, text, request)
            on_progress(f"reference: {sum(p.numel() for p in parts)} tokens in {len(parts)} windows")
            for index, logprobs in enumerate(_logprobs(reference, parts)):
                torch.save(logprobs, os.path.join(scratch, f"{index}.pt"))
        rows = []
        for candidate in request.candidates:
            on_progress(f"{candidate.label}: reading the same windows")
            with _open(request, candidate.model, candidate.config) as model:
                agreement = Agreement()
                for index, logprobs in enumerate(_logprobs(model, parts)):
                    reference_logprobs = torch.load(os.path.join(scratch, f"{index}.pt"), weights_only=True)
                    agreement.add(reference_logprobs, logprobs, parts[index][1:])
                unpack = model.decompressor
                bits = bits_per_weight(unpack.codec, unpack.packed) if unpack is not None else None
                rows.append({"format": candidate.label, "bits_per_weight": bits, **agreement.summary()})
    return {"model": request.model, "text": request.text_path or f"bundled ({BUNDLED_TEXT})",
            "window_tokens": request.window_tokens, "formats": rows}


def _scratch_dir(config: Any) -> str:
    os.makedirs(config.runtime.cache_dir, exist_ok=True)
    return config.runtime.cache_dir


def _open(request: QualityRequest, model: str, config: Any) -> Any:
    from ..compose import AutoModel

    return AutoModel.from_pretrained(model, budget=request.budget, config=config, dtype=request.dtype,
                                     trust_remote_code=request.trust_remote_code,
                                     allow_download=request.allow_download, progress=True)


def _tokenize(model: Any, text: str, request: QualityRequest) -> list[torch.Tensor]:
    if model.tokenizer is None:
        raise InputError(f"{request.model} ships no tokenizer; eval needs one to read the text")
    ids = model.tokenizer(text, return_tensors="pt").input_ids[0]
    if request.max_tokens is not None:
        ids = ids[:request.max_tokens]
    if model.max_context is not None:
        window = min(request.window_tokens, model.max_context)
    else:
        window = request.window_tokens
    parts = windows(ids, window)
    if not parts:
        raise InputError(f"the text is {ids.numel()} tokens long; eval needs at least 2")
    return parts


def _logprobs(model: Any, parts: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each window's next-token log-probabilities [tokens - 1, vocab], float32, on the CPU."""
    with torch.no_grad():
        for part in parts:
            logits = model(part[None], use_cache=False).logits[0, :-1]
            yield logits.float().log_softmax(-1).cpu()


def write_off_grid(gguf: str, out_dir: str, noise: float, seed: int = 0) -> None:
    """The model of a GGUF with Gaussian noise (`noise` × each decoder-layer matrix's standard deviation) added to
    its layer matrices, as a float32 safetensors checkpoint in `out_dir` (kept if already there): weights moved off
    the grid the file quantized them to, so that a format with that grid is not flattered by it."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return
    directory, name = os.path.dirname(gguf), os.path.basename(gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".layers." in param_name and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * param.std() * noise)
    os.makedirs(out_dir, exist_ok=True)  # transformers will not save a model it loaded from a GGUF: write it here
    state = {key: value.contiguous() for key, value in model.state_dict().items()
             if not (key == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(out_dir)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with open(os.path.join(out_dir, "config.json"), "w") as handle:  # written last: the checkpoint is whole
        json.dump(config, handle, indent=1)
