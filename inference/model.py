"""`AutoModel.from_pretrained`: a transformers model whose weights live in the tiered store.

transformers' own forward and `generate` run unchanged: KV cache, masks, sampling, streamers. Hooks on each
unit's module fetch its weights from the store just in time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ..budget import Budget
from ..compression import Codec, Decompressor, PackedMatrices, compressed_layout, scratch_bytes
from ..config import Config
from ..errors import BudgetError, CheckpointError, ConfigError, InputError, ModelError
from ..files import PAGE_BYTES, check_writable
from ..planning import (
    ACTIVATION_SLACK_BYTES,
    DraftCost,
    device_reserve_bytes,
    effective_budgets,
    kv_bytes_per_token,
    plan_input,
)
from ..policies.planner import Plan, PlanInput, make_plan
from ..policies.speculation import DEFAULT_MAX_DEPTH, DepthPolicy
from ..probe import load_probe
from ..report import RunReport, Timing
from ..sizes import format_size
from ..store import TieredStore
from ..trace import TOKENS, Tracer
from ..transfer import make_transfer
from ..units import align, require_tensors
from .checkpoint import (
    checkpoint_dtype,
    in_place_source,
    load_config,
    load_tokenizer,
    store_source,
)
from .convert import compress, convert, default_store_dir
from .hooks import AttachedHooks
from .resolve import Checkpoint, resolve
from .skeleton import build_skeleton
from .speculation import SpeculationStats

log = logging.getLogger(__name__)


def compute_device(setting: str) -> torch.device:
    """The compute device a config asks for; auto = the first GPU if there is one."""
    if setting == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"runtime.device = {setting!r} but this machine has no usable CUDA GPU")
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


class _StepClock:
    """A logits processor that only reads the clock: the first call ends prefill, later calls are decode steps.
    With a tracer, each call also marks a token on the timeline."""

    def __init__(self, tracer: Tracer | None = None) -> None:
        self.start_s = time.perf_counter()
        self.calls: list[float] = []
        self._tracer = tracer

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor | None) -> torch.Tensor | None:
        self.calls.append(time.perf_counter())
        if self._tracer is not None:
            self._tracer.instant(TOKENS, "token", self._tracer.stamp(), index=len(self.calls) - 1)
        return scores


@contextlib.contextmanager
def _quiet_forward() -> Iterator[None]:
    """No autograd, and none of the warnings transformers gives about the skeleton: its parameters are on `meta`
    between forwards; newer releases also warn about the `past_key_values` name the loop passes."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*different than your model's device")
        warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated")
        yield


class TierstoreModel:
    """A causal LM running layer by layer out of the tiered store."""

    def __init__(self, model: Any, tokenizer: Any, store: TieredStore, hooks: AttachedHooks, plan: Plan,
                 plan_input: PlanInput, device: torch.device, config: Config, setup_s: float,
                 decompressor: Decompressor | None = None, draft: Any = None,
                 draft_cost: DraftCost | None = None, tracer: Tracer | None = None) -> None:
        self.model = model
        self.tracer = tracer
        self.plan_input = plan_input
        self.tokenizer = tokenizer
        self.store = store
        self.plan = plan
        self.device = device
        self.config = config
        self.setup_s = setup_s
        self._hooks = hooks
        self.decompressor = decompressor
        self.draft = draft  # "ngram" (NgramDraft) or a TierstoreModel; None: no speculation
        self.draft_cost = draft_cost
        self._timing = Timing()
        self._notes: list[str] = []
        self._closed = False
        self._speculation: SpeculationStats | None = None
        self._max_depth = config.speculation.depth or DEFAULT_MAX_DEPTH
        # learns pass and draft-step costs across calls; a configured depth is drafted every pass
        self._depth_policy = DepthPolicy(self._max_depth, fixed=config.speculation.depth is not None)

    @property
    def max_context(self) -> int | None:
        """The model's context length from its config, if it states one."""
        text = self.model.config.get_text_config()
        return getattr(text, "max_position_embeddings", None)

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """transformers' `generate`, same arguments and result; times prefill and decode for the report, whose
        counters cover this call."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        self._check_input(input_ids)
        max_new = kwargs.get("max_new_tokens")
        if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1):
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new!r}")
        total = input_ids.shape[-1] + (max_new or 0)
        if self.max_context and total > self.max_context:
            raise InputError(f"prompt of {input_ids.shape[-1]} tokens plus {max_new} new tokens exceeds the "
                             f"model's context of {self.max_context}")
        for name in ("assistant_model", "prompt_lookup_num_tokens"):
            if kwargs.get(name) is not None:
                raise InputError(f"{name} is not supported; open the model with a draft instead: "
                                 f"from_pretrained(..., draft=\"ngram\" or a small model)")
        notes = self._fit_kv_cache(input_ids.shape[0] * total, kwargs)
        input_ids = input_ids.to(self.device)
        self.store.reset_counters()
        if self.tracer is not None:
            self.tracer.anchor()
        if self.draft is not None:
            return self._speculate(input_ids, kwargs, notes)
        if "attention_mask" in kwargs and kwargs["attention_mask"] is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"].to(self.device)
        clock = _StepClock(self.tracer)
        processors = list(kwargs.pop("logits_processor", None) or [])
        from transformers import LogitsProcessorList
        with _quiet_forward():
            out = self.model.generate(input_ids, logits_processor=LogitsProcessorList([*processors, clock]),
                                      **kwargs)
        self._record(clock, decode_steps=max(len(clock.calls) - 1, 0), new_tokens=len(clock.calls),
                     batch_size=input_ids.shape[0], notes=notes)
        return out

    def _check_input(self, input_ids: Any) -> None:
        """Refuse what would fail deep inside the model: a closed model, no tokens, ids outside the vocabulary."""
        if self._closed:
            raise InputError("this model is closed; open it again with AutoModel.from_pretrained")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point:
            raise InputError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.numel() == 0 or input_ids.shape[-1] == 0:
            raise InputError("empty prompt: give at least one token")
        vocab = self.model.config.get_text_config().vocab_size
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise InputError(f"token id {low if low < 0 else high} is outside the vocabulary (0 to {vocab - 1})")

    def _record(self, clock: _StepClock, decode_steps: int, new_tokens: int, batch_size: int,
                notes: list[str]) -> None:
        """The timing of the call that just ended (its device work included) and its notes, for the report."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        end_s = time.perf_counter()
        first = clock.calls[0] if clock.calls else end_s
        self._timing = Timing(prefill_s=first - clock.start_s, decode_s=end_s - first, decode_steps=decode_steps,
                              new_tokens=new_tokens, batch_size=batch_size)
        log.info("generated %d tokens x %d sequences: prefill %.3f s, decode %.3f s over %d passes", new_tokens,
                 batch_size, self._timing.prefill_s, self._timing.decode_s, decode_steps)
        self._notes = notes
        if self.tracer is not None:
            self.tracer.write()

    def _fit_kv_cache(self, cache_tokens: int, kwargs: dict[str, Any]) -> list[str]:
        """Keep the KV cache inside the device budget: when this call's cache outgrows the reserve, re-plan with
        a larger reserve (fewer resident weights); when even that cannot fit, say so before anything runs."""
        if self.device.type != "cuda" or "past_key_values" in kwargs:
            return []
        scratch = self.decompressor.scratch.nbytes if self.decompressor is not None else 0
        draft = self.draft_cost.device_bytes(cache_tokens) if self.draft_cost is not None else 0
        needed = (kv_bytes_per_token(self.model.config, self.model.dtype) * cache_tokens + ACTIVATION_SLACK_BYTES
                  + scratch + draft)
        if needed <= self.plan.device_reserve_bytes:
            return []
        try:
            plan = make_plan(dataclasses.replace(self.plan_input, device_reserve_bytes=needed))
        except BudgetError as exc:
            raise InputError(f"a batch of {cache_tokens} cache tokens needs {format_size(needed)} of KV cache and "
                             f"activations (and the dequantization buffer and draft), more than the device budget "
                             f"{format_size(self.plan.device_budget_bytes)} leaves beside the weights; use fewer "
                             f"prompts or tokens") from exc
        self.store.replan(plan)
        self.plan = plan
        return [f"KV cache and activations need {format_size(needed)}: device reserve raised, "
                f"{len(plan.device_resident)} units now resident"]

    def _speculate(self, input_ids: torch.Tensor, kwargs: dict[str, Any], notes: list[str]) -> torch.Tensor:
        """generate with the draft: one weight pass verifies each tree of drafted tokens."""
        from .drafts import ModelDraft, NgramDraft
        from .speculation import check_speculation_request, chooser, sampling_warp, speculate
        from .tree import check_window

        check_speculation_request(input_ids.shape[0], kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:  # a lone prompt may still come left-padded
            input_ids = input_ids[:, mask[0].bool()]
        settings = self.model.generation_config
        do_sample = kwargs.get("do_sample", settings.do_sample)
        warp = sampling_warp(*(kwargs.get(name, getattr(settings, name)) if do_sample else None
                               for name in ("temperature", "top_k", "top_p")))
        eos = kwargs.get("eos_token_id", settings.eos_token_id)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        max_new = kwargs.get("max_new_tokens") or settings.max_new_tokens or 20
        check_window(self.model.config, input_ids.shape[1] + max_new, "the model")
        if isinstance(self.draft, TierstoreModel):
            check_window(self.draft.model.config, input_ids.shape[1] + max_new, f"draft {self.draft_cost.name}")
        if isinstance(self.draft, NgramDraft):
            draft = self.draft
        else:
            draft = ModelDraft(self.draft, self.draft_cost.name, warp, self.model.config.get_text_config().vocab_size,
                               self.config.speculation.width, self._depth_policy)
        stats = SpeculationStats(draft.name)
        clock = _StepClock(self.tracer)
        with _quiet_forward():
            out = speculate(self.model, draft, input_ids, max_new, chooser(do_sample, warp), eos_ids, stats,
                            self._max_depth, kwargs.get("streamer"), on_first_token=lambda: clock(None, None),
                            tracer=self.tracer)
        self._record(clock, decode_steps=stats.passes, new_tokens=stats.new_tokens, batch_size=1, notes=notes)
        self._speculation = stats
        return out

    def __call__(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """A plain forward (e.g. for logits), weights streamed the same way."""
        if input_ids is not None:
            self._check_input(input_ids)
            input_ids = input_ids.to(self.device)
        with torch.no_grad():
            return self.model(input_ids, **kwargs)

    def report(self) -> RunReport:
        """The run report of the last `generate` call: its timing and its tier counters."""
        return RunReport(plan=self.plan, tiers=self.store.tier_stats(), timing=self._timing,
                         device=str(self.device), setup_s=self.setup_s, notes=[*self._budget_notes(), *self._notes],
                         speculation=self._speculation.to_dict() if self._speculation is not None else None)

    def _budget_notes(self) -> list[str]:
        """How the device budget asked for is shared out, when part of it is not weights."""
        scratch = self.decompressor.scratch.nbytes if self.decompressor is not None else 0
        draft = self.draft_cost.reserve_bytes(self.device) if self.draft_cost is not None else 0
        if not self.plan.device_reserve_bytes:
            return []
        parts = [f"{format_size(self.plan.device_weights_bytes)} for weights"]
        kept = self.plan.device_reserve_bytes - scratch - draft
        if kept:
            parts.append(f"{format_size(kept)} kept for activations and the KV cache")
        if scratch:
            parts.append(f"{format_size(scratch)} for the dequantization buffer")
        if draft:
            parts.append(f"{format_size(draft)} for the draft")
        return [f"device budget {format_size(self.plan.device_budget_bytes)}: {', '.join(parts)}"]

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"plan {self.plan.regime}, {len(self.plan.schedule)} units"
        draft = f", draft {self.draft_cost.name if self.draft_cost else 'ngram'}" if self.draft is not None else ""
        return (f"TierstoreModel({self.model.config.model_type}, {self.device}, {self.model.dtype}, "
                f"device budget {format_size(self.plan.device_budget_bytes)}, host budget "
                f"{format_size(self.plan.host_budget_bytes)}, {state}{draft})")

    def close(self) -> None:
        """Detach the hooks and stop the store's threads (the draft's too). Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        if isinstance(self.draft, TierstoreModel):
            self.draft.close()
        self._hooks.detach()
        self.store.close()
        self.decompressor = None
        close_source(self.store.source)
        if self.tracer is not None:
            self.tracer.write()
            self.tracer = None

    def __enter__(self) -> "TierstoreModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A compute dtype as users give it: a torch dtype, its name ("float16", "torch.float16"), or None."""
    if dtype is None or dtype in DTYPES.values():
        return dtype  # type: ignore[return-value]
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; use {', '.join(DTYPES)}")
    return DTYPES[name]


def prepare(model: str, budget: Budget | None = None, config: Any = None, dtype: torch.dtype | None = None,
            trust_remote_code: bool = False, allow_download: bool = False,
            progress: bool = False) -> tuple[Config, Checkpoint, Any, torch.device, torch.dtype]:
    """Resolve, convert if needed and read the config: everything `plan` and `from_pretrained` share.

    Returns the config, the checkpoint to read units from, its transformers config, the device and the dtype."""
    cfg = Config.load(config).with_budget(budget)
    device = compute_device(cfg.runtime.device)
    checkpoint = resolve(model, allow_download=allow_download)
    log.info("%s: a %s checkpoint at %s; compute on %s", model, checkpoint.kind, checkpoint.path, device)
    store_dir = None
    if checkpoint.kind in ("gguf", "bin"):
        store_dir = default_store_dir(checkpoint, cfg.runtime.cache_dir, None)
        convert(checkpoint, store_dir, trust_remote_code=trust_remote_code, progress=progress,
                disk_budget_bytes=cfg.budget.disk)
    elif checkpoint.kind == "store":
        store_dir = checkpoint.path
    read_from = Checkpoint("store", store_dir, checkpoint.name) if store_dir else checkpoint
    hf_config = load_config(read_from, trust_remote_code)
    if dtype is None:
        dtype = checkpoint_dtype(hf_config) if device.type == "cuda" else torch.float32
    return cfg, read_from, hf_config, device, dtype


class AutoModel:
    """Entry point, named as transformers names its own."""

    @staticmethod
    def from_pretrained(model: str, budget: Budget | None = None, config: Any = None,
                        dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                        allow_download: bool = False, progress: bool = False,
                        draft: str | None = None, trace: str | None = None) -> TierstoreModel:
        """Open `model` (directory, GGUF, layer store, alias or cached Hub id) under `budget`. `draft`: "ngram"
        or a small model with the same tokenizer (anything `model` may be) for speculative decoding; a model
        draft is resident on the device and its bytes come out of the device budget. `trace`: a file to write
        the timeline to after each `generate` (overrides `runtime.trace`)."""
        from .drafts import check_same_vocabulary, open_draft

        start_s = time.perf_counter()
        dtype = as_dtype(dtype)
        trace = trace or Config.load(config).runtime.trace
        if trace is not None:
            check_writable(trace, "trace file")  # refused before anything is converted or read
        if draft is not None and draft != "ngram":
            resolve(draft, allow_download=allow_download)  # a missing draft is refused before anything is written
        cfg, checkpoint, hf_config, device, dtype = prepare(model, budget, config, dtype, trust_remote_code,
                                                            allow_download, progress)
        drafter, draft_cost = (open_draft(draft, cfg, device, dtype, trust_remote_code, allow_download, progress)
                               if draft is not None else (None, None))
        try:
            tokenizer = load_tokenizer(checkpoint, trust_remote_code)
            if isinstance(drafter, TierstoreModel):
                check_same_vocabulary(hf_config, tokenizer, drafter, draft)
            opened = open_units(cfg, checkpoint, hf_config, device, dtype, trust_remote_code, progress,
                                draft=draft_cost)
            plan = opened.plan
            host_capacity = min(plan.host_budget_bytes, sum(align(layout.nbytes, PAGE_BYTES)
                                                            for layout in opened.layouts.values()))
            transfer = make_transfer(device, cfg.io.pinned_memory, host_capacity)
            tracer = Tracer(trace, device, _trace_meta(model, device, cfg, plan)) if trace is not None else None
            store = TieredStore(opened.source, opened.layouts, plan, transfer, reader_threads=cfg.io.reader_threads,
                                on_event=tracer.store_event if tracer is not None else None)
            store.disk_stats.budget_bytes = cfg.budget.disk
            decompressor = Decompressor(opened.codec, opened.packed, dtype, device) if opened.codec else None
            hooks = AttachedHooks(opened.skeleton, store, device, decompressor, tracer)
            log.info("plan %s: %d units resident on %s, %d in host RAM, %d read from disk each pass; prefetch depth "
                     "%d; ready in %.1f s", plan.regime, len(plan.device_resident), device, len(plan.host_resident),
                     len(plan.streamed_from_disk), plan.prefetch_depth, time.perf_counter() - start_s)
            return TierstoreModel(opened.skeleton.model, tokenizer, store, hooks, plan, opened.plan_input, device,
                                  cfg, time.perf_counter() - start_s, decompressor, drafter, draft_cost, tracer)
        except BaseException:
            if isinstance(drafter, TierstoreModel):
                drafter.close()
            raise


def _trace_meta(model: str, device: torch.device, cfg: Config, plan: Plan) -> dict[str, Any]:
    """What a trace's reader needs beside the events: the run, and each link's bound from the probe."""
    probe = load_probe(cfg.runtime.cache_dir) or {}
    pinned = device.type == "cuda" and cfg.io.pinned_memory
    link = probe.get("h2d_pinned_gbps" if pinned else "h2d_gbps") if device.type == "cuda" else None
    return {"tool": "tierstore", "model": model, "device": str(device),
            "device_budget_bytes": plan.device_budget_bytes, "host_budget_bytes": plan.host_budget_bytes,
            "prefetch_depth": plan.prefetch_depth, "device_resident": list(plan.device_resident),
            "bound_gb_per_s": {"disk": probe.get("disk_gbps"), "host->device": link}}


@dataclasses.dataclass(frozen=True)
class OpenedUnits:
    """What running (or planning) a model needs: the skeleton, the unit source and layouts, the plan, what it was
    made from, and, for a compressed store, its codec and where each unit's matrices are packed."""

    skeleton: Any
    source: Any
    layouts: dict[str, Any]
    plan: Plan
    plan_input: PlanInput
    codec: Codec | None = None
    packed: dict[str, PackedMatrices] = dataclasses.field(default_factory=dict)


def open_units(cfg: Config, checkpoint: Checkpoint, hf_config: Any, device: torch.device, dtype: torch.dtype,
               trust_remote_code: bool, progress: bool, write: bool = True,
               draft: DraftCost | None = None) -> OpenedUnits:
    """Open the units of `checkpoint` and plan them, beside `draft` when one is given. With `write` False no
    compressed store is written: one that does not exist yet is planned from the layouts it would have."""
    if cfg.runtime.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError("runtime.attention = \"flash_attention_2\" needs the flash-attn package "
                         "(pip install 'tierstore[flash]'); or use \"sdpa\"")
    stored = checkpoint_dtype(hf_config)  # before building the model, which sets the config's dtype to `dtype`
    skeleton = build_skeleton(hf_config, dtype, trust_remote_code, attn_implementation=cfg.runtime.attention)
    drop_cache = device.type == "cuda" if cfg.io.direct_io is None else cfg.io.direct_io
    source, checkpoint = _open_source(cfg, checkpoint, skeleton, dtype, drop_cache, trust_remote_code, progress)
    codec, packed = getattr(source, "codec", None), dict(getattr(source, "packed", {}))
    wanted = Codec.wanted(cfg.compression)
    if codec is not None and wanted is not None and wanted != codec:
        raise ConfigError(f"{checkpoint.path} is stored as {codec.name}; compression asks for {wanted.name}: "
                          f"use the uncompressed model, or compression.format = \"none\"")
    if codec is None and wanted is not None and write:
        store_dir = default_store_dir(checkpoint, cfg.runtime.cache_dir, None, variant=wanted.name)
        compress(source, skeleton, checkpoint, store_dir, wanted, device, trust_remote_code, progress,
                 disk_budget_bytes=cfg.budget.disk)
        close_source(source)
        source, _ = store_source(store_dir, cfg.io.verify_checksums, dtype, drop_cache)
        checkpoint, codec, packed = Checkpoint("store", store_dir, checkpoint.name), source.codec, source.packed
    if codec is None and wanted is not None:  # planning only: the layouts compression would give
        codec = wanted
        layouts = {}
        for key in skeleton.units:
            layouts[key], unit_packed = compressed_layout(source.layout(key), skeleton.matrices, codec)
            if unit_packed is not None:
                packed[key] = unit_packed
    else:
        layouts = {key: source.layout(key) for key in skeleton.units}
    _check_store_matches(checkpoint, skeleton.units, layouts, packed)
    measured = Budget.measure(cfg.runtime.cache_dir)
    device_bytes, host_bytes, notes = effective_budgets(cfg.budget, measured, device)
    reserve = device_reserve_bytes(hf_config, dtype, device, cfg.runtime.device_reserve)
    if codec is not None:
        reserve += scratch_bytes(packed, dtype)
        notes.append(_compression_note(skeleton, layouts, codec, packed, dtype))
    draft_bytes = draft.reserve_bytes(device) if draft is not None else 0
    if draft is not None:
        reserve += draft_bytes
        notes.append(draft.note(device))
    notes.append(f"disk reads: {getattr(source, 'read_mode', 'page cache')}")
    if device.type == "cpu" and dtype != stored:
        notes.append(f"weights stored in {str(stored).removeprefix('torch.')} run in "
                     f"{str(dtype).removeprefix('torch.')} on the CPU (--dtype, or dtype=, chooses)")
    planned_from = plan_input({key: layout.nbytes for key, layout in layouts.items()}, skeleton.schedule,
                              device_bytes, host_bytes, reserve, cfg.policy, load_probe(cfg.runtime.cache_dir), notes,
                              device)
    try:
        plan = make_plan(planned_from)
    except BudgetError as exc:
        if draft is None:
            raise
        make_plan(dataclasses.replace(planned_from, device_reserve_bytes=reserve - draft_bytes))
        close_source(source)  # the model fits without the draft: the draft is what does not fit
        raise InputError(f"draft {draft.name} needs {format_size(draft_bytes)} ({draft_bytes} bytes) of the device "
                         f"budget, and the model cannot run in what is left: {exc}") from exc
    return OpenedUnits(skeleton, source, layouts, plan, planned_from, codec, packed)


def _open_source(cfg: Config, checkpoint: Checkpoint, skeleton: Any, dtype: torch.dtype, drop_cache: bool,
                 trust_remote_code: bool, progress: bool) -> tuple[Any, Checkpoint]:
    """The unit source of a safetensors directory (read in place) or a layer store, converting safetensors whose
    names need transformers' conversion rules once; returns it with the checkpoint it reads."""
    if checkpoint.kind == "safetensors":
        source = in_place_source(checkpoint, skeleton.units, dtype, drop_cache)
        if source is not None:
            return source, checkpoint
        store_dir = default_store_dir(checkpoint, cfg.runtime.cache_dir, None)
        convert(checkpoint, store_dir, trust_remote_code=trust_remote_code, progress=progress,
                disk_budget_bytes=cfg.budget.disk)
        checkpoint = Checkpoint("store", store_dir, checkpoint.name)
    return store_source(checkpoint.path, cfg.io.verify_checksums, dtype, drop_cache)[0], checkpoint


def compress_model(model: str, out_dir: str, format: str, dtype: torch.dtype | None = None, config: Any = None,
                   trust_remote_code: bool = False, progress: bool = True) -> str:
    """Write a compressed layer store of `model` into `out_dir` (what `tierstore convert --compress` runs).
    Norms and embeddings are kept in `dtype` (default: the checkpoint's); matrices are quantized on the GPU when
    there is one."""
    cfg = Config.load(config).with_compression(format)
    codec = Codec.wanted(cfg.compression)
    if codec is None:
        raise InputError("compress_model needs a format: nf4 or int8")
    _, checkpoint, hf_config, device, _ = prepare(model, None, cfg, None, trust_remote_code, progress=progress)
    dtype = dtype or checkpoint_dtype(hf_config)
    skeleton = build_skeleton(hf_config, dtype, trust_remote_code)
    source, checkpoint = _open_source(cfg, checkpoint, skeleton, dtype, False, trust_remote_code, progress)
    if getattr(source, "codec", None) is not None:
        raise InputError(f"{checkpoint.path} is already compressed ({source.codec.name})")
    try:
        return compress(source, skeleton, checkpoint, out_dir, codec, device, trust_remote_code, progress,
                        disk_budget_bytes=cfg.budget.disk)
    finally:
        close_source(source)


def _compression_note(skeleton: Any, layouts: dict[str, Any], codec: Codec, packed: dict[str, PackedMatrices],
                      dtype: torch.dtype) -> str:
    plain = sum(p.numel() for p in skeleton.model.parameters()) * dtype.itemsize
    stored = sum(layout.nbytes for layout in layouts.values())
    return (f"weights stored as {codec.format} (blocksize {codec.blocksize}): {format_size(stored)} instead of "
            f"{format_size(plain)} in {str(dtype).removeprefix('torch.')}; each unit dequantized on use into a "
            f"{format_size(scratch_bytes(packed, dtype))} buffer")


def close_source(source: Any) -> None:
    """Close a unit source's files, if it keeps any open."""
    closer = getattr(source, "close", None)
    if closer is not None:
        closer()


def _check_store_matches(checkpoint: Checkpoint, units: dict[str, list[str]], layouts: dict[str, Any],
                         packed: dict[str, PackedMatrices]) -> None:
    for key, names in units.items():
        held = set(layouts[key].slots) | set(packed[key].matrices if key in packed else ())
        require_tensors(key, names, held, checkpoint.path)
