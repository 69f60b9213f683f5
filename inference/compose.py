"""The composer: the one place that opens a model, as one line of steps.

    resolve -> open units (converting once if needed) -> shard (tensor parallelism) -> draft -> place (the plan)
    -> open the stores -> attach the module adapters -> TierstoreModel

Each step is a function called once, from `AutoModel.from_pretrained`. Everything a step opens goes onto one
`contextlib.ExitStack`: a failing step closes what came before it, and the model closes the stack (in reverse
order) when it closes. `make_plan_for` (`tierstore plan`) runs the steps up to the plan without reading weights;
a model draft is opened by `from_pretrained` itself, and `compress_model` reads the units as opening would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..allocation import candidates
from ..budget import Budget
from ..calibration import calibration_text
from ..compression import GPTQ, MIXED, Codec, Decompressor, recipe_formats, scratch_bytes
from ..config import AUTO, TFLOAT32, Config
from ..errors import InputError
from ..files import check_writable
from ..policies.planner import Plan, PlanInput
from ..policies.speculation import DEFAULT_MAX_NODES
from ..probe import load_probe
from ..rotation import HADAMARD
from ..store import TieredStore
from ..trace import Tracer
from ..transfer import make_transfer
from .decoding.drafts import NGRAM_BRANCHES, NgramDraft
from .decoding.importance import measure_importance, measure_rounding, measure_sensitivity
from .decoding.model import ModelParts, TierstoreModel
from .devices import DTYPES, as_dtype, compute_device
from .loading.checkpoint import checkpoint_dtype, load_config, load_tokenizer
from .loading.convert import convert, convert_if_needed, keeps_ggml
from .loading.resolve import Checkpoint, resolve
from .loading.shards import blocks_note, rank_note, rank_store, shard_units, whole_model_config
from .loading.skeleton import build_skeleton
from .loading.sources import Units, as_compressed, open_units
from .loading.spill import SpilledTensors
from .loading.splits import Group, cut_blocks
from .loading.store_writer import compress
from .placement.budgets import DraftCost, kv_bytes_per_token, pinned_arena_bytes
from .placement.kv import KVBudget
from .placement.plan import per_matrix_units, place
from .runtime.adapters import attach
from .runtime.bound import BoundWeights, unpacked_bytes
from .runtime.collectives import TIMEOUT_S, Collectives, join_group, leave_group, rank_device
from .runtime.experts import ExpertRunner, Packed, open_experts
from .runtime.fused_norms import FusedNorms
from .runtime.fused_rotary import FusedRotary
from .runtime.hooks import AttachedHooks
from .runtime.lookup import HostLookup, without_lookup

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OpenRequest:
    """What `from_pretrained` was asked for, checked: the checkpoint found, the config with the budget in it, and
    the compute device."""

    model: str
    checkpoint: Checkpoint
    cfg: Config
    device: torch.device
    dtype: torch.dtype | None
    trust_remote_code: bool
    allow_download: bool
    progress: bool
    draft: str | None
    trace: str | None
    tensor_parallel: int
    host_lookup: bool = True  # an input embedding the RAM budget holds may stay there (not for a resident draft)
    bound: bool = False  # every unit resident, bound once, the forward compiled (a draft, speculation.compile)


class AutoModel:
    """Entry point, named as transformers names its own."""

    @staticmethod
    def from_pretrained(model: str, budget: Budget | dict[str, Any] | None = None, config: Any = None,
                        dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
                        allow_download: bool = False, progress: bool = False,
                        draft: str | None = None, trace: str | None = None,
                        tensor_parallel: int = 1) -> TierstoreModel:
        """Open `model` (directory, GGUF, layer store, alias or cached Hub id) under `budget`. `draft`: "ngram"
        or a small model with the same tokenizer (anything `model` may be) for speculative decoding; a model
        draft is resident on the device and its bytes come out of the device budget. `trace`: a file to write
        the timeline to after each `generate` (overrides `runtime.trace`). `tensor_parallel`: N > 1 in each of
        N processes started by `torchrun --nproc-per-node N` (or `tierstore generate --tp N`): this process holds
        and streams its shard of every unit, under `budget` for its own device (see loading/shards.py)."""
        request = _request(model, budget, config, dtype, trust_remote_code, allow_download, progress, draft, trace,
                           tensor_parallel)
        return _open(request)


def _open(request: OpenRequest) -> TierstoreModel:
    """The steps of opening, in order, each once."""
    start_s = time.perf_counter()
    with contextlib.ExitStack() as resources:  # closed here only if a step fails; else the model's
        group, device = _join_ranks(request, resources)
        units, rank_notes = _open_units(request, device, group, resources)
        tokenizer = load_tokenizer(units.checkpoint, request.trust_remote_code)
        drafter, draft_cost = _open_draft(request, device, units, tokenizer, resources)
        plan, planned_from = place(units, request.cfg, device, draft_cost,
                                   host_lookup=group is None and request.host_lookup)
        plan = dataclasses.replace(plan, notes=(*plan.notes, *rank_notes))
        parts = _open_runtime(request, device, units, tokenizer, (plan, planned_from, draft_cost), resources)
        log.info("plan %s: %d units resident on %s, %d in host RAM, %d read from disk each pass; prefetch depth "
                 "%d; ready in %.1f s", plan.regime, len(plan.device_resident), device, len(plan.host_resident),
                 len(plan.streamed_from_disk), plan.prefetch_depth, time.perf_counter() - start_s)
        parts = dataclasses.replace(parts, draft=drafter, setup_s=time.perf_counter() - start_s)
        return TierstoreModel(parts, resources.pop_all())


def _request(model: str, budget: Any, config: Any, dtype: Any, trust_remote_code: bool, allow_download: bool,
             progress: bool, draft: str | None, trace: str | None, tensor_parallel: int) -> OpenRequest:
    """The request, checked before anything is converted, written or read."""
    cfg = Config.load(config).with_budget(budget)
    trace = trace or cfg.runtime.trace
    if trace is not None:
        check_writable(trace, "trace file")
    _check_tensor_parallel(cfg, tensor_parallel, draft)
    if draft is not None and (not isinstance(draft, str) or not draft.strip()):
        raise InputError(f"draft: expected \"ngram\" or a model (path, alias, Hub id), got {draft!r}")
    checkpoint = resolve(model, allow_download=allow_download, weights=tensor_parallel == 1)  # ranks: shard stores
    if draft not in (None, "ngram"):
        resolve(draft, allow_download=allow_download)  # a missing draft is refused before anything is written
    return OpenRequest(model, checkpoint, cfg, compute_device(cfg.runtime.device), as_dtype(dtype),
                       trust_remote_code, allow_download, progress, draft, trace, tensor_parallel)


def _check_tensor_parallel(cfg: Config, tensor_parallel: int, draft: str | None) -> None:
    """Refuse what tensor parallelism cannot run, before anything is written."""
    if tensor_parallel < 1:
        raise InputError(f"tensor_parallel must be at least 1, got {tensor_parallel}")
    if tensor_parallel > 1 and draft is not None:
        raise InputError("a draft speculates on one device; tensor parallelism runs without one")
    if tensor_parallel > 1 and cfg.compression.format == "mixed":
        raise InputError("compression.format = mixed measures one process's model to choose its formats; tensor "
                         "parallelism quantizes each rank's shard on its own: choose one format with --tp")
    if tensor_parallel > 1 and cfg.compression.format != "none" and cfg.compression.rotation == HADAMARD:
        raise InputError("compression.rotation turns whole blocks of a matrix's columns, which tensor parallelism "
                         "cuts between ranks: leave rotation unset with --tp")
    if tensor_parallel > 1 and cfg.compression.format != "none" and cfg.compression.calibration is not None:
        raise InputError("compression.calibration measures one process's model; tensor parallelism quantizes each "
                         "rank's shard data-free: leave calibration unset with --tp")


def _join_ranks(request: OpenRequest, resources: contextlib.ExitStack) -> tuple[Group | None, torch.device]:
    """This process's place among the tensor-parallel ranks (None: it runs alone) and its compute device; the
    group it sets up is ended with the model."""
    if request.tensor_parallel == 1:
        return None, request.device
    device = rank_device(request.device)
    group = join_group(request.tensor_parallel, device, TIMEOUT_S)
    if group.owned:
        resources.callback(leave_group)
    return group, device


def _open_units(request: OpenRequest, device: torch.device, group: Group | None,
                resources: contextlib.ExitStack) -> tuple[Units, tuple[str, ...]]:
    """The model's units, their files closed with the model, and the plan's notes on them. Under tensor
    parallelism, this rank's shards (compressed by the rank when the config asks), and the adapter combining the
    ranks' outputs after the modules they split."""
    checkpoint = request.checkpoint
    log.info("%s: a %s checkpoint at %s; compute on %s", request.model, checkpoint.kind, checkpoint.path, device)
    if group is None:
        units = open_units(checkpoint, request.cfg, device, request.dtype, request.trust_remote_code,
                           request.progress, importance=_importance(request))
        resources.callback(units.close)
        return units, ()
    units = open_units(checkpoint, whole_model_config(request.cfg), device, request.dtype,
                       request.trust_remote_code, request.progress)
    resources.callback(units.close)
    notes = _rank_notes(units, group, request.cfg)
    units, styles = shard_units(units, group)
    units = rank_store(units, group, request.cfg, device, request.progress, request.trust_remote_code)
    resources.callback(units.close)
    attach(resources, Collectives(styles, group))
    return units, notes


def _rank_notes(whole: Units, group: Group, cfg: Config) -> tuple[str, ...]:
    """The plan's notes on a rank's share of the `whole` (uncompressed) units: what it holds and, compressed,
    whether its quantization blocks are a one-process model's."""
    codec = Codec.wanted(cfg.compression)
    if codec is None:
        return (rank_note(group),)
    return rank_note(group, codec), blocks_note(cut_blocks(whole.skeleton, whole.layouts, group, codec))


def _importance(request: OpenRequest) -> Callable[[str], Mapping[str, torch.Tensor]] | None:
    """How a calibrated compression gets its importance matrix (None for one that needs none): the model, opened
    uncompressed under the same budget, reads the calibration text. What it measures waits in the folder it is
    given (GPTQ's blocks are as large as the store: spill.py)."""
    setting = request.cfg.compression.calibration
    if setting is None or request.cfg.compression.format == "none":
        return None

    def measure(folder: str) -> Mapping[str, torch.Tensor]:
        log.info("%s: measuring the importance matrix over the calibration text (%s)", request.model, setting)
        plain = dataclasses.replace(request, cfg=request.cfg.with_compression("none"), draft=None, trace=None)
        text = calibration_text(setting)
        measured = SpilledTensors(folder)
        with _open(plain) as model:
            measured.update(measure_importance(model, text))
            if request.cfg.compression.format == MIXED:
                log.info("%s: measuring each matrix's sensitivity for mixed formats", request.model)
                measured.update(measure_sensitivity(model, text))
            if request.cfg.compression.rounding == GPTQ:
                log.info("%s: rounding each matrix by GPTQ over the calibration text", request.model)
                names = frozenset(name for name, _ in model.model.named_parameters())
                measure_rounding(model, text, _rounded_formats(request.cfg, names), into=measured,
                                 rotated=request.cfg.compression.rotation == HADAMARD)
            return measured
    return measure


def _rounded_formats(cfg: Config, names: frozenset[str]) -> Callable[[str, tuple[int, ...]], tuple[str, ...]]:
    """The formats GPTQ writes a matrix in under `cfg`'s recipe (the model's parameters are `names`): its own, or
    for mixed every candidate (the allocation then picks one by their measured errors)."""
    codec = Codec.wanted(cfg.compression)

    def formats(name: str, shape: tuple[int, ...]) -> tuple[str, ...]:
        if codec.recipe == MIXED:
            return candidates(math.prod(shape), codec.bits)
        return (recipe_formats(codec, {name: shape}, names)[name],)
    return formats


def _open_draft(request: OpenRequest, device: torch.device, units: Units, tokenizer: Any,
                resources: contextlib.ExitStack) -> tuple[Any, DraftCost | None]:
    """The draft the request names ("ngram", or a model opened resident on the device in `draft_dtype`: the
    target's unless speculation.draft_dtype names one) and what it costs on the device (None for ngram); a model
    draft closes with the model."""
    if request.draft is None:
        return None, None
    if request.draft == "ngram":
        return NgramDraft(request.cfg.speculation.ngram, min(request.cfg.speculation.width, NGRAM_BRANCHES)), None
    cfg = request.cfg
    dtype = draft_dtype(cfg, units.dtype)
    # refused before the draft is converted or read when the model cannot run beside what it would take
    place(units, cfg, device, _plan_draft(request.draft, cfg, device, dtype, request.trust_remote_code,
                                          request.allow_download))
    draft_cfg = _draft_config(cfg, device, dtype)
    # all of it on the device, its input embedding too: a draft step is captured as a CUDA graph, which cannot
    # copy rows from RAM
    bound = cfg.speculation.compile
    model = _open(dataclasses.replace(
        _request(request.draft, None, draft_cfg, dtype, request.trust_remote_code, request.allow_download,
                 request.progress, None, None, 1), host_lookup=False, bound=bound))
    resources.callback(model.close)
    scratch = model.decompressor.scratch.nbytes if model.decompressor is not None else 0
    if bound and model.decompressor is not None:  # its matrices unpacked beside the packed units
        scratch += unpacked_bytes(model.decompressor.packed, dtype)
    cost = _with_ahead(_draft_cost(request.draft, model.store.layouts, scratch, model.model.config, dtype),
                       cfg, device)
    if model.plan.regime != "device":
        raise InputError(f"draft {request.draft} needs {cost.weights_bytes} bytes on the device, more than is free "
                         f"there")
    check_same_vocabulary(units.hf_config, tokenizer, model, request.draft)
    return model, cost


def _draft_config(cfg: Config, device: torch.device, dtype: torch.dtype) -> Config:
    """The config a model draft in `dtype` opens with. Its own budget: whatever is free (it must all fit); what it
    takes is charged to the target's plan. Resident, a mixture-of-experts draft keeps its experts inside its
    layers: no routing read back per layer, so its steps can be captured in a CUDA graph. A float32 draft on a GPU
    attends eagerly unless runtime.attention names a kernel: SDPA has no flash kernel for float32, and its
    memory-efficient one took 4.4 of a 9.5 ms SmolLM2 step on an H100, where eager attention's step took 6.7 ms
    (benchmarks/draft_step.py --draft-dtypes float32 --attention sdpa,eager)."""
    attention = cfg.runtime.attention
    if attention == AUTO and dtype == torch.float32 and device.type == "cuda":
        attention = "eager"
    return dataclasses.replace(
        cfg.with_compression("none").without_expert_streaming(), budget=Budget(),
        runtime=dataclasses.replace(cfg.runtime, device=str(device), device_reserve=0, trace=None,
                                    attention=attention))


def _open_runtime(request: OpenRequest, device: torch.device, units: Units, tokenizer: Any,
                  placed: tuple[Plan, PlanInput, DraftCost | None], resources: contextlib.ExitStack) -> ModelParts:
    """Carry out the plan (`placed`: it, what it was made from, and a draft's device cost): the input embedding
    kept in RAM, the stores (dense units, routed experts), the dequantization, and the module adapters; returns
    the model's parts (its draft and timing still to add)."""
    cfg = request.cfg
    plan, planned_from, draft_cost = placed
    lookup = None
    if plan.host_lookup:
        lookup = attach(resources, HostLookup(units, plan.host_lookup[0], device, cfg.io.pinned_memory))
        units = without_lookup(units, plan.host_lookup)  # the store streams the rest
    tracer = Tracer(request.trace, device, _trace_meta(request.model, device, cfg, plan)) if request.trace else None
    expert_keys = units.skeleton.expert_keys
    dense = {key: layout for key, layout in units.layouts.items() if key not in expert_keys}
    transfer = make_transfer(device, cfg.io.pinned_memory, pinned_arena_bytes(plan.host_budget_bytes, dense))
    store = TieredStore(units.source, dense, plan, transfer, reader_threads=cfg.io.reader_threads,
                        on_event=tracer.store_event if tracer is not None else None)
    resources.callback(store.close)
    store.disk_stats.budget_bytes = cfg.budget.disk
    experts = _open_experts(cfg, device, units, plan, store, tracer, resources) if plan.experts else None
    decompressor = Decompressor(units.codec, units.dense_packed, units.dtype, device,
                                per_matrix_units(units, plan.device_budget_bytes)) if units.codec else None
    if request.bound:
        attach(resources, BoundWeights(units.skeleton, store, device, decompressor))
    else:
        attach(resources, AttachedHooks(units.skeleton, store, device, decompressor, tracer))
    if cfg.runtime.fused_norms != "off":
        attach(resources, FusedNorms(units.skeleton.model.modules()))
    if cfg.runtime.fused_rotary != "off":
        attach(resources, FusedRotary(units.skeleton.model.modules(), device))
    kv_budget = KVBudget(planned_from, cfg.runtime.kv_cache, device.type == "cuda", units.hf_config, units.dtype,
                         _unpacking_bytes(decompressor, experts), draft_cost,
                         sum(layout.nbytes for layout in dense.values()),
                         cfg.runtime.kv_dir or os.path.join(cfg.runtime.cache_dir, "kv"))
    return ModelParts(units.skeleton.model, tokenizer, store, plan, planned_from, kv_budget, device, cfg, 0.0,
                      decompressor, draft_cost=draft_cost, tracer=tracer, experts=experts, lookup=lookup,
                      compiled=torch.compile(units.skeleton.model) if request.bound else None)


def _unpacking_bytes(decompressor: Decompressor | None, experts: ExpertRunner | None) -> int:
    """Device bytes of the dequantization buffers: the dense units', and the window of compressed experts."""
    return (decompressor.scratch.nbytes if decompressor is not None else 0) + \
        (experts.unpacked_window_bytes if experts is not None else 0)


def _open_experts(cfg: Config, device: torch.device, units: Units, plan: Plan, store: TieredStore,
                  tracer: Tracer | None, resources: contextlib.ExitStack) -> ExpertRunner:
    """The routed experts' own store (device slots, host RAM, disk) and the adapter running MoE layers on it."""
    layouts = {key: units.layouts[key] for key in units.skeleton.expert_keys}
    transfer = make_transfer(device, cfg.io.pinned_memory, pinned_arena_bytes(plan.experts.host_bytes, layouts))
    on_event = functools.partial(tracer.store_event, prefix="experts ") if tracer is not None else None
    packed = {key: units.packed[key] for key in layouts if key in units.packed}
    runner = open_experts(units.skeleton.experts, units.source, layouts, plan.experts, store, transfer,
                          cfg.io.reader_threads, on_event,
                          Packed(units.codec, packed, units.dtype) if packed else None)
    resources.callback(runner.store.close)
    return attach(resources, runner)


def _trace_meta(model: str, device: torch.device, cfg: Config, plan: Plan) -> dict[str, Any]:
    """What a trace's reader needs beside the events: the run, and each link's bound from the probe."""
    probe = load_probe(cfg.runtime.cache_dir) or {}
    pinned = device.type == "cuda" and cfg.io.pinned_memory
    link = probe.get("h2d_pinned_gbps" if pinned else "h2d_gbps") if device.type == "cuda" else None
    return {"tool": "tierstore", "model": model, "device": str(device),
            "device_budget_bytes": plan.device_budget_bytes, "host_budget_bytes": plan.host_budget_bytes,
            "prefetch_depth": plan.prefetch_depth, "device_resident": list(plan.device_resident),
            "bound_gb_per_s": {"disk": probe.get("disk_gbps"), "host->device": link}}


def make_plan_for(model: str, budget: Budget | dict[str, Any] | None, config: Any, trust_remote_code: bool = False,
                  allow_download: bool = False, draft: str | None = None, tensor_parallel: int = 1) -> Plan:
    """The plan `from_pretrained` would make (with `draft` beside the model; with `tensor_parallel` N, rank 0's,
    whose shards are every rank's size), without reading any weights: a directory holding only config.json is
    enough."""
    cfg = Config.load(config).with_budget(budget)
    _check_tensor_parallel(cfg, tensor_parallel, draft)
    device = compute_device(cfg.runtime.device)
    checkpoint = resolve(model, allow_download, weights=False)
    whole_cfg = whole_model_config(cfg) if tensor_parallel > 1 else cfg
    units = open_units(checkpoint, whole_cfg, device, None, trust_remote_code, progress=True, write=False)
    try:
        notes: tuple[str, ...] = ()
        if tensor_parallel > 1:
            group = Group(0, tensor_parallel)
            notes = _rank_notes(units, group, cfg)
            units = shard_units(units, group)[0]
            codec = Codec.wanted(cfg.compression)
            units = as_compressed(units, codec) if codec is not None else units
        if checkpoint.kind == "config":
            notes = (f"planned from {checkpoint.path}/config.json alone: no weights are present, and a run needs "
                     f"them", *notes)
        cost = _plan_draft(draft, cfg, device, draft_dtype(cfg, units.dtype), trust_remote_code,
                           allow_download) if draft else None
        plan = place(units, cfg, device, cost, host_lookup=tensor_parallel == 1)[0]
        return dataclasses.replace(plan, notes=(*plan.notes, *notes))
    finally:
        units.close()


def draft_dtype(cfg: Config, model_dtype: torch.dtype) -> torch.dtype:
    """A model draft's dtype: `speculation.draft_dtype` (tfloat32: float32, its products on TF32 tensor cores),
    or the model's (auto)."""
    name = cfg.speculation.draft_dtype
    return model_dtype if name == AUTO else torch.float32 if name == TFLOAT32 else DTYPES[name]


def _plan_draft(spec: str, cfg: Config, device: torch.device, dtype: torch.dtype, trust_remote_code: bool,
                allow_download: bool) -> DraftCost | None:
    """What `_open_draft` would charge to the device budget (None for ngram), a tree grown ahead included where
    the draft may grow one (`speculation.ahead` true or auto, on a GPU)."""
    return _with_ahead(_draft_cost_of(spec, cfg, device, dtype, trust_remote_code, allow_download), cfg, device)


def _with_ahead(cost: DraftCost | None, cfg: Config, device: torch.device) -> DraftCost | None:
    """`cost` with the KV entries of a tree grown ahead, where the draft may grow one (`speculation.ahead` true or
    auto, on a GPU)."""
    if cost is None or device.type != "cuda" or cfg.speculation.ahead is False:
        return cost
    return dataclasses.replace(cost, ahead_tokens=cfg.speculation.nodes or DEFAULT_MAX_NODES)


def _draft_cost_of(spec: str, cfg: Config, device: torch.device, dtype: torch.dtype, trust_remote_code: bool,
                   allow_download: bool) -> DraftCost | None:
    """What a draft holds on the device: its weights and KV cache per token, with no weights read and nothing
    converted: a store's or safetensors' layouts, or a GGUF's or .bin's parameters counted on the meta device (a
    draft runs uncompressed, in `dtype`; bound for `speculation.compile`, a GGUF kept packed counts its file too,
    an upper bound of the packed copy kept beside the unpacked matrices)."""
    if spec == "ngram":
        return None
    checkpoint = resolve(spec, allow_download)
    if checkpoint.kind in ("gguf", "bin"):
        hf_config = load_config(checkpoint, trust_remote_code)
        skeleton = build_skeleton(hf_config, dtype, trust_remote_code)
        weights = sum(param.numel() for param in skeleton.model.parameters()) * dtype.itemsize
        if cfg.speculation.compile and keeps_ggml(checkpoint, _draft_config(cfg, device)):
            weights += os.path.getsize(checkpoint.path)
        return DraftCost(spec, weights, kv_bytes_per_token(hf_config, dtype))
    units = open_units(checkpoint, cfg.with_compression("none").without_expert_streaming(), device, dtype,
                       trust_remote_code, progress=True, write=False)
    units.close()
    scratch = scratch_bytes(units.packed, dtype)
    if cfg.speculation.compile:
        scratch += unpacked_bytes(units.packed, dtype)
    return _draft_cost(spec, units.layouts, scratch, units.hf_config, dtype)


def _draft_cost(spec: str, layouts: dict[str, Any], scratch: int, hf_config: Any, dtype: torch.dtype) -> DraftCost:
    """A draft's device cost: all its units, its dequantization buffer, and its KV cache per token."""
    weights = sum(layout.nbytes for layout in layouts.values()) + scratch
    return DraftCost(spec, weights, kv_bytes_per_token(hf_config, dtype))


def check_same_vocabulary(target_config: Any, target_tokenizer: Any, draft: TierstoreModel, name: str) -> None:
    """A model draft must speak the target's tokens: the same tokenizer vocabulary (or, without tokenizers, the
    same vocabulary size). Draft ids past the target's vocabulary are never proposed."""
    target_vocab = target_config.get_text_config().vocab_size
    draft_vocab = draft.model.config.get_text_config().vocab_size
    if target_tokenizer is not None and draft.tokenizer is not None:
        if target_tokenizer.get_vocab() != draft.tokenizer.get_vocab():
            raise InputError(f"draft {name}: its tokenizer differs from the model's ({len(draft.tokenizer)} "
                             f"against {len(target_tokenizer)} tokens); a draft needs the same tokenizer")
    elif target_vocab != draft_vocab:
        raise InputError(f"draft {name}: vocabulary of {draft_vocab} tokens, the model has {target_vocab}")


def convert_model(model: str, out_dir: str, dtype: torch.dtype | str | None = None, compress: str | None = None,
                  config: Any = None, trust_remote_code: bool = False) -> str:
    """Write the layer store of `model` into `out_dir` (what `tierstore convert` runs): its tensors in `dtype`
    (None: as the checkpoint stores them; a GGUF's matrices packed as `compression.gguf` says), or compressed with
    `compress` ("nf4", "int8"); `config`'s budget.disk caps its size. Returns `out_dir`."""
    dtype = as_dtype(dtype)
    cfg = Config.load(config)
    if compress:
        return compress_model(model, out_dir, compress, dtype, config=cfg, trust_remote_code=trust_remote_code)
    checkpoint = resolve(model)
    return convert(checkpoint, out_dir, dtype=dtype, trust_remote_code=trust_remote_code, progress=True,
                   disk_budget_bytes=cfg.budget.disk, keep_ggml=keeps_ggml(checkpoint, cfg))


def compress_model(model: str, out_dir: str, format: str, dtype: torch.dtype | None = None, config: Any = None,
                   trust_remote_code: bool = False, progress: bool = True) -> str:
    """Write a compressed layer store of `model` into `out_dir` (what `tierstore convert --compress` runs).
    Norms and embeddings are kept in `dtype` (default: the checkpoint's); matrices are quantized on the GPU when
    there is one."""
    cfg = Config.load(config).with_compression(format)
    codec = Codec.wanted(cfg.compression)
    if codec is None:
        raise InputError("compress_model needs a format: nf4 or int8")
    device = compute_device(cfg.runtime.device)
    checkpoint = convert_if_needed(resolve(model), cfg, trust_remote_code, progress)
    dtype = dtype or checkpoint_dtype(load_config(checkpoint, trust_remote_code))
    # the base is read as compression will pack it: each expert a unit of its own under expert streaming
    units = open_units(checkpoint, cfg.with_compression("none"), device, dtype, trust_remote_code, progress)
    try:
        if units.codec is not None:
            raise InputError(f"{units.checkpoint.path} is already compressed ({units.codec.name})")
        request = _request(model, None, cfg, dtype, trust_remote_code, False, progress, None, None, 1)
        return compress(units.source, units.skeleton, units.checkpoint, out_dir, codec, device, trust_remote_code,
                        progress, disk_budget_bytes=cfg.budget.disk, importance=_importance(request))
    finally:
        units.close()
