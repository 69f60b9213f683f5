"""A transformers model whose weights live in the tiered store (opened by `compose.AutoModel.from_pretrained`).

transformers' own forward and `generate` run unchanged (KV cache, masks, sampling, streamers); hooks fetch each
unit's weights from the store just in time. This adds the timing and the report, fits the KV cache into the
device budget, and runs speculative decoding when the model has a draft.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...compression import Decompressor
from ...config import AUTO, Config
from ...errors import BudgetError, InputError
from ...policies.planner import Plan, PlanInput
from ...policies.speculation import DEFAULT_MAX_NODES, TreePolicy
from ...report import RunReport, Timing
from ...sizes import format_size
from ...store import TieredStore
from ...trace import TOKENS, Tracer
from ..devices import give_back_cache
from ..loading.skeleton import decoder_layers
from ..placement.budgets import ACTIVATION_SLACK_BYTES, DraftCost
from ..placement.kv import KVBudget, KVTiers, Workload, describe_tiers, device_shares
from ..placement.prefill import plan_prefill, tree_bytes, tree_nodes_within
from ..runtime.expert_budget import PassRate
from ..runtime.experts import ExpertRunner
from ..runtime.lookup import HostLookup
from ..runtime.prefix_cache import PrefixCache, cache_layers, model_key, restore
from ..runtime.reserved_cache import reserved_cache
from ..runtime.tiered_kv import KVTraffic, TieredKVCache
from .graphed import GraphedDecoder, GraphStats, attention_refusal, call_settings, refusal
from .layer_graphs import LayerGraphs, cuda_record, layer_units, resident_layers
from .prefill import feed_prompt, feed_prompt_planned, plan_feed
from .sampling import chooser, eos_ids, warp
from .speculation import SpeculationStats
from .verifier import GraphedVerifier, Verifier

log = logging.getLogger(__name__)


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


# cuDNN's attention builds a plan for each new key length: 34-54 ms a length on an H200 (torch 2.11), where the
# flash and memory-efficient kernels take 0.1 ms. A decode step meets a new length every time, so a 7B model's first
# call ran at 0.24 s/token against 0.205 s once the lengths had been seen (the link's bound: 0.2045 s).
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def quiet_forward() -> Iterator[None]:
    """No autograd, attention without cuDNN's per-length plans, and none of the warnings transformers gives about
    the skeleton: its parameters are on `meta` between forwards; newer releases also warn about the
    `past_key_values` name the loop passes."""
    with torch.no_grad(), sdpa_kernel(ATTENTION_BACKENDS), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*different than your model's device")
        warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated")
        yield


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """What the composer opened for a model: the skeleton (`model`, transformers' own), its tokenizer, the store
    and the plan it carries out (what that was planned from, and what the KV cache may take), the compute device,
    the config, the seconds opening took, and what only some models have."""

    model: Any
    tokenizer: Any
    store: TieredStore
    plan: Plan
    plan_input: PlanInput
    kv_budget: KVBudget  # what the KV cache may take beside the weights
    device: torch.device
    config: Config
    setup_s: float
    decompressor: Decompressor | None = None  # a compressed model's dequantization
    draft: Any = None  # NgramDraft or a TierstoreModel: speculative decoding
    draft_cost: DraftCost | None = None  # a model draft's device bytes
    tracer: Tracer | None = None
    experts: ExpertRunner | None = None  # routed experts fetched as picked (a mixture-of-experts model)
    lookup: HostLookup | None = None  # the input embedding answered from RAM
    compiled: Any = None  # torch.compile of `model`, whose weights are bound (a draft under speculation.compile)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TierstoreModel:
    """A causal LM running layer by layer out of the tiered store. `resources` holds everything opened for it
    (files, store threads and memory, module adapters, a draft, a process group), undone in reverse order by
    `close`."""

    def __init__(self, parts: ModelParts, resources: contextlib.ExitStack) -> None:
        self.model = parts.model
        self.experts = parts.experts
        self.lookup = parts.lookup
        self.tracer = parts.tracer
        self.plan_input = parts.plan_input
        self.tokenizer = parts.tokenizer
        self.store = parts.store
        self.plan = parts.plan
        self.device = parts.device
        self.config = parts.config
        self.setup_s = parts.setup_s
        self.decompressor = parts.decompressor
        self.draft = parts.draft
        self.draft_cost = parts.draft_cost
        self.kv_budget = parts.kv_budget
        self.compiled = parts.compiled
        self._resources = resources
        self._timing = Timing()
        self.kv_tiers: KVTiers | None = None  # where each layer's KV lives when not all on the device (fit_kv_cache)
        self._notes: list[str] = []
        self._closed = False
        self._speculation: SpeculationStats | None = None
        self._prefixes: PrefixCache | None = None  # opened on first use (`prefix_cache`)
        self._graphed: GraphedDecoder | None = None  # made on the first call whose decode steps can be graphed
        self._graphed_layers: tuple[int, ...] | None = None  # the resident layers it replays (None: whole steps)
        self._graphed_verifier: GraphedVerifier | None = None  # made on the first draft call that can be graphed
        self._graphs_read: tuple[int, ...] | None = None  # the resident units' addresses the kept graphs read
        self._kv_call: dict[str, Any] | None = None  # the last generate call's KV cache, for the report
        # the tree policy learns the draft step's and the verify pass's costs across calls (a target whose routed
        # experts are fetched as picked verifies a larger tree at a higher cost: the curve shows it); a configured
        # depth is drafted every pass
        self.forget_tree_costs()

    @property
    def kv_on_host(self) -> bool:
        """Whether the KV cache has layers off the device (in host RAM or on disk)."""
        return self.kv_tiers is not None

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
        rows, prompt_tokens = input_ids.shape[0], input_ids.shape[-1]
        workload = Workload(prompt_tokens, max_new or 20, lambda plan: plan_prefill(
            self.kv_budget, plan, prompt_tokens, rows, False, self.config.runtime.prefill_chunk).chunk_tokens)
        notes = [] if "past_key_values" in kwargs else self.fit_kv_cache(rows * total, workload=workload)
        input_ids = input_ids.to(self.device)
        self.store.reset_counters()
        if self.experts is not None:
            self.experts.reset()
        if self.tracer is not None:
            self.tracer.anchor()
        self._forget_moved_graphs()
        if self.draft is not None:
            return self._speculate(input_ids, kwargs, notes)
        unfit = self._graph_refusal(input_ids, kwargs, total)
        if unfit is None:
            return self._generate_graphed(input_ids, kwargs, notes)
        notes.extend([f"decode steps not graphed: {unfit}"] if unfit else [])
        if "attention_mask" in kwargs and kwargs["attention_mask"] is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"].to(self.device)
        clock = _StepClock(self.tracer)
        keep_prefix = False
        self._kv_call = {"cache_tokens": input_ids.shape[0] * total, "chunk": None, "reused": 0,
                         "tiers": self.kv_tiers}
        if "past_key_values" not in kwargs:
            cache, keep_prefix = self._prefill_chunks(input_ids, kwargs.get("attention_mask"), total, notes)
            if cache is not None:
                kwargs["past_key_values"] = cache
        processors = list(kwargs.pop("logits_processor", None) or [])
        from transformers import LogitsProcessorList
        with quiet_forward():
            out = self.model.generate(input_ids, logits_processor=LogitsProcessorList([*processors, clock]),
                                      **kwargs)
        if keep_prefix:
            self._keep_prefix(out, kwargs["past_key_values"])
        self._settle_tiered(kwargs.get("past_key_values"))
        self._record(clock, decode_steps=max(len(clock.calls) - 1, 0), new_tokens=len(clock.calls),
                     batch_size=input_ids.shape[0], notes=notes)
        return out

    def _graph_refusal(self, input_ids: torch.Tensor, kwargs: dict[str, Any], total_tokens: int) -> str | None:
        """Why this call's decode steps cannot replay a CUDA graph (None: they can; "": not asked for, or not on a
        GPU)."""
        unfit = self._model_graph_refusal(input_ids.shape[0], traced=True, streamed=True)
        if unfit is not None:
            return unfit
        if self.prefix_cache() is not None:
            return "the prefix cache keeps transformers' own cache"
        return refusal(self.model.generation_config, kwargs, self.model.config, input_ids, total_tokens)

    def graph_rows_refusal(self, rows: int, max_seq_tokens: int) -> str | None:
        """Why a batch's decode steps of up to `rows` sequences of `max_seq_tokens` cannot replay CUDA graphs
        (None: they can; "": not asked for, or not on a GPU)."""
        unfit = self._model_graph_refusal(rows)
        return unfit if unfit is not None else attention_refusal(self.model.config, max_seq_tokens)

    def _model_graph_refusal(self, tokens: int, traced: bool = False, streamed: bool = False) -> str | None:
        """Why a forward of `tokens` tokens (a batch's decode step, a verify pass) cannot replay a CUDA graph, on
        the model's side (None: it can; "": not asked for, or not on a GPU). `traced`: the caller traces its
        replays (generate's decode steps do). `streamed`: the caller replays the resident layers of a model that
        streams others (generate's decode steps do)."""
        if self.config.runtime.cuda_graphs == "off" or self.device.type != "cuda":
            return ""
        moving = self._moving_units()
        if moving and not (streamed and self.experts is None and self._resident_layers()):
            return f"{moving} of the model's units are not kept on the device (streamed units change addresses)"
        if moving and self.tracer is not None:
            return "a trace records every unit's events, which a layer's replay does not run"
        if self.experts is not None and not self.experts.graphable(tokens):
            return "routed experts are fetched as the router picks them"
        if self.kv_on_host:
            return "the KV cache has layers off the device"
        if self.tracer is not None and not traced:
            return "a trace records every unit's events, which a replay does not run"
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return "tensor-parallel ranks run their collectives eagerly"
        if not self._plain_cache():
            return "the model makes its own cache"
        return None

    def _forget_moved_graphs(self) -> None:
        """Let go of the whole-model graphs kept from earlier calls (a whole decode step's, the verify passes') when
        a unit they read is no longer where it was when they last ran: a re-plan in between evicted it, and it came
        back elsewhere or not yet. A replay would read the old address."""
        if self._graphs_read is None or self._resident_addresses() == self._graphs_read:
            return
        if self._graphed_layers is None:
            self._graphed = None
        self._graphed_verifier = self._graphs_read = None

    def _resident_addresses(self) -> tuple[int, ...]:
        return self.store.device_addresses(sorted(self.plan.device_resident))

    def _moving_units(self) -> int:
        """How many units are not kept on the device (streamed, or an embedding answered from RAM)."""
        plan = self.plan
        looked_up = 0 if self.lookup is not None and self.lookup.mapped is not None else len(plan.host_lookup)
        return len(set(plan.schedule) - set(plan.device_resident)) + looked_up

    def _resident_layers(self) -> dict[int, list[tuple[str, int]]]:
        return resident_layers(self.store.schedule, self.plan.device_resident)

    def _decoder(self) -> GraphedDecoder:
        """The graphed decoder for the plan as it is: whole steps replayed where every unit stays on the device,
        else the resident layers replayed inside eager steps (made anew when the resident layers change)."""
        resident = self._resident_layers() if self._moving_units() else None
        shape = None if resident is None else tuple(sorted(resident))
        if self._graphed is None or self._graphed_layers != shape:
            layers = feed = None
            if resident is not None:
                graphed = resident if self.config.runtime.cuda_graphs == "resident" \
                    else layer_units(self.store.schedule)
                layers = LayerGraphs(decoder_layers(self.model, self.model.config)[1], graphed, self.store,
                                     cuda_record(self.device), resident=resident)
                feed = lambda kv, input_ids: feed_prompt_planned(self, kv, input_ids)  # noqa: E731
            self._graphed = GraphedDecoder(self.model, self.device,
                                           self.experts.before_replay if self.experts is not None else None,
                                           self.tracer, layers=layers, feed=feed)
            self._graphed_layers = shape
        return self._graphed

    def _generate_graphed(self, input_ids: torch.Tensor, kwargs: dict[str, Any], notes: list[str]) -> torch.Tensor:
        """generate with every decode step replayed from a CUDA graph (`graphed.GraphedDecoder`), or, where some
        layers stream, each resident layer's part of it."""
        settings = call_settings(self.model.generation_config, kwargs)[0]
        rows, prompt = input_ids.shape
        max_new = settings.max_new_tokens if settings.max_new_tokens is not None else settings.max_length - prompt
        warped = warp(settings.temperature, settings.top_k, settings.top_p) if settings.do_sample else None
        ends = settings.eos_token_id if isinstance(settings.eos_token_id, list) else \
            [] if settings.eos_token_id is None else [settings.eos_token_id]
        pad = settings.pad_token_id if settings.pad_token_id is not None else (ends[0] if ends else 0)
        decoder = self._decoder()
        layers = decoder.layers
        before = (layers.replays, layers.streamed_replays, layers.capture_s) if layers is not None else (0, 0, 0.0)
        clock = _StepClock(self.tracer)
        self._kv_call = {"cache_tokens": rows * (prompt + max_new), "chunk": None, "reused": 0, "tiers": None}
        with quiet_forward():
            out, stats = decoder.generate(input_ids, max(max_new, 1), chooser(settings.do_sample, warped),
                                          eos_ids(ends), pad, kwargs.get("streamer"), lambda: clock(None, None))
        failure = decoder.failure if layers is None else layers.failure
        if layers is not None:
            streamed = layers.streamed_replays - before[1]
            replays, capture_s = layers.replays - before[0] - streamed, layers.capture_s - before[2]
            recorded = f"recorded in {capture_s:.2f} s" if capture_s else "recorded by an earlier call"
            also = f"; the {layers.count - layers.resident_count} streamed layers: {streamed} replays" \
                if layers.count > layers.resident_count else ""
            notes.append(f"decode steps eager, the {layers.resident_count} decoder layers kept on the device replayed "
                         f"from CUDA graphs of their own: {replays} replays{also} ({recorded})" if not failure
                         else f"decode steps eager: a layer's CUDA graph capture failed ({failure})")
        else:
            notes.append(f"decode steps not graphed: CUDA graph capture failed ({failure}); they ran eagerly"
                         if failure else f"decode steps replayed from a CUDA graph (captured in "
                         f"{stats.capture_s:.2f} s)" if stats.capture_s
                         else "decode steps replayed from the CUDA graph of an earlier call")
        self._record(clock, decode_steps=max(len(clock.calls) - 1, 0), new_tokens=len(clock.calls), batch_size=rows,
                     notes=notes, graph=None if failure or layers is not None else stats)
        if layers is None:
            self._graphs_read = self._resident_addresses()
        return out

    def _prefill_chunks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, total_tokens: int,
                        notes: list[str]) -> tuple[Any, bool]:
        """The cache generate starts from (None: transformers makes its own), and whether to keep it as a prefix
        after. A prompt that starts like a sequence in the prefix cache (`runtime.prefix_cache_dir`) starts from
        that sequence's KV cache. When one pass over the rest would not fit the device budget (`plan_feed`), all
        but the last token are fed here in chunks (`feed_prompt`); generate feeds what is left. On the device the
        cache is written in place (`reserved_cache`, room for `total_tokens`). A model whose cache is not
        transformers' DynamicCache runs its prompt in one pass."""
        cache = self.new_kv_cache(total_tokens)
        prompt = input_ids.shape[1] - 1
        plain = cache is None and self._plain_cache()
        prefixes = self.prefix_cache() if plain and input_ids.shape[0] == 1 else None
        start = 0
        if prefixes is not None:
            cache = reserved_cache(self.model.config, total_tokens)
            hit = prefixes.lookup(input_ids[0].tolist())
            if hit is not None:
                start, layers = hit
                self._kv_call["reused"] = start
                restore(cache, layers, self.device)
                notes.append(f"prefix cache: {start} of the prompt's {prompt + 1} tokens reused")
        if start >= prompt:
            return cache, prefixes is not None  # all but the last token reused: generate feeds that one
        planned = plan_feed(self, prompt - start, input_ids.shape[0], attention_mask)
        if (planned.chunk_tokens >= prompt - start and planned.plan is None and not start) or \
                (cache is None and not plain):
            return cache, prefixes is not None  # one pass, generate's own: its activations fit the reserve
        if cache is None:
            cache = reserved_cache(self.model.config, total_tokens)
        with quiet_forward():
            note = feed_prompt(self, input_ids, cache, start, prompt, attention_mask, planned)[1]
        self._kv_call["chunk"] = planned.chunk_tokens if planned.chunk_tokens < prompt - start else None
        if isinstance(cache, TieredKVCache):  # what decoding moves is counted from here
            self._kv_call["prefill_traffic"] = dataclasses.replace(cache.traffic)
        notes.extend([note] if note else [])
        return cache, prefixes is not None

    def _settle_tiered(self, cache: Any) -> None:
        """A TieredKVCache's bytes by tier and what its decode passes moved, for the report; then its files and
        buffers are let go."""
        if not isinstance(cache, TieredKVCache):
            return
        cache.settle()
        decode = cache.traffic.since(self._kv_call.pop("prefill_traffic", KVTraffic()))
        self._kv_call.update(tier_bytes=cache.tier_bytes(), decode=decode.per_pass())
        cache.close()

    def prefix_cache(self) -> PrefixCache | None:
        """The prefix cache (`runtime.prefix_cache_dir`), opened on first use; None when none is configured."""
        runtime = self.config.runtime
        if self._prefixes is None and runtime.prefix_cache_dir is not None:
            self._prefixes = self.open_prefix_cache()
        return self._prefixes

    def open_prefix_cache(self) -> PrefixCache:
        """A prefix cache for this model as configured (a server opens one even without a directory)."""
        runtime = self.config.runtime
        key = model_key(self.model.config, self.model.dtype, self.store.layouts, self.config.compression)
        return PrefixCache(key, runtime.prefix_cache_ram or 0, runtime.prefix_cache_dir,
                           runtime.prefix_cache_disk or 0, pinned=self.device.type == "cuda")

    def _keep_prefix(self, out: torch.Tensor, cache: Any) -> None:
        """The sequence generate just made, as a prefix for later prompts (what its cache holds)."""
        layers = cache_layers(cache)
        if layers is not None and self._prefixes is not None:
            length = cache.get_seq_length()
            self._prefixes.store(out[0, :length].tolist(), [(k[..., :length, :], v[..., :length, :])
                                                            for k, v in layers])

    def _plain_cache(self) -> bool:
        """Whether transformers would give this model its DynamicCache (not a static, quantized or model-made one)."""
        return self.model._supports_default_dynamic_cache() and \
            getattr(self.model.generation_config, "cache_implementation", None) is None

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
                notes: list[str], graph: GraphStats | None = None) -> None:
        """The timing of the call that just ended (its device work included) and its notes, for the report;
        `graph`: its decode steps replayed a CUDA graph."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        end_s = time.perf_counter()
        first = clock.calls[0] if clock.calls else end_s
        self._timing = Timing(prefill_s=first - clock.start_s, decode_s=end_s - first, decode_steps=decode_steps,
                              new_tokens=new_tokens, batch_size=batch_size,
                              graphed=None if self.device.type != "cuda" else graph is not None,
                              host_step_s=graph.host_step_s if graph is not None else None)
        log.info("generated %d tokens x %d sequences: prefill %.3f s, decode %.3f s over %d passes", new_tokens,
                 batch_size, self._timing.prefill_s, self._timing.decode_s, decode_steps)
        self._notes = notes + (self.experts.end_call() if self.experts is not None else [])
        if self.tracer is not None:
            self.tracer.write()

    def fit_kv_cache(self, cache_tokens: int, tiered: bool = True, workload: Workload | None = None) -> list[str]:
        """Place a KV cache of `cache_tokens` (over all sequences) before anything runs (`KVBudget.placement`; a
        batch whose rows change is not `tiered`; a generate call's `workload` weighs the placements): re-plan the
        device tier when its reserve must grow, and say where the cache lives. InputError when no budget allowed
        holds it. Returns notes for the report."""
        try:
            tiers, plan = self.kv_budget.placement(self.plan, cache_tokens, tiered, workload)
        except BudgetError as exc:
            raise InputError(self.kv_budget.refusal(self.plan, cache_tokens, tiered)) from exc
        self.kv_tiers = tiers
        if plan is not None:
            self.store.replan(plan)
            self.plan = plan
        return self.kv_budget.notes(cache_tokens, tiers, plan, tiered)

    def kv_placement(self, cache_tokens: int, tiered: bool = True) -> tuple[KVTiers | None, Plan | None]:
        """Where a KV cache of `cache_tokens` would live (None: on the device; else a tier per layer), and the plan
        it needs (None: the current one); BudgetError when it fits nowhere allowed. Changes nothing."""
        return self.kv_budget.placement(self.plan, cache_tokens, tiered)

    def new_kv_cache(self, capacity_tokens: int | None = None) -> Any:
        """The cache a generate call (room for `capacity_tokens` per sequence) or a fresh batch (None: its rows
        change) starts with: None (the model makes its own, on the device) when the cache lives there; else a
        `TieredKVCache` with each layer where `fit_kv_cache` placed it, or for a batch transformers' offloaded
        DynamicCache in host RAM (`HostKVCache`)."""
        if self.kv_tiers is None:
            return None
        if capacity_tokens is None:
            from ..runtime.host_cache import HostKVCache

            return HostKVCache(self.model.config)
        from ..runtime.tiered_kv import TieredKVCache

        return TieredKVCache(self.model.config, self.kv_tiers, capacity_tokens, self.device, self.kv_budget.disk_dir)

    def settle_kv_cache(self) -> None:
        """Wait for the host cache's copies in flight, before its tensors are reshaped between passes."""
        if self.kv_tiers is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _speculate(self, input_ids: torch.Tensor, kwargs: dict[str, Any], notes: list[str]) -> torch.Tensor:
        """generate with the draft: one weight pass verifies each tree of drafted tokens."""
        from .drafts import ModelDraft, NgramDraft
        from .speculation import check_speculation_request, speculate
        from .tree import check_mask_support, check_window

        if self.kv_on_host:
            raise InputError("speculative decoding keeps its KV cache on the device, and this one does not fit "
                             "there: shorten the prompt or max_new_tokens, or raise --vram")
        check_speculation_request(input_ids.shape[0], kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:  # a lone prompt may still come left-padded
            input_ids = input_ids[:, mask[0].bool()]
        settings = self.model.generation_config
        do_sample = kwargs.get("do_sample", settings.do_sample)
        warped = warp(*(kwargs.get(name, getattr(settings, name)) if do_sample else None
                        for name in ("temperature", "top_k", "top_p")))
        ends = eos_ids(kwargs.get("eos_token_id", settings.eos_token_id))
        max_new = kwargs.get("max_new_tokens") or settings.max_new_tokens or 20
        check_window(self.model.config, input_ids.shape[1] + max_new, "the model")
        check_mask_support(self.model.config, "the model")
        if isinstance(self.draft, TierstoreModel):
            check_window(self.draft.model.config, input_ids.shape[1] + max_new, f"draft {self.draft_cost.name}")
            check_mask_support(self.draft.model.config, f"draft {self.draft_cost.name}")
        nodes = self._tree_nodes(input_ids.shape[1] + max_new)
        if isinstance(self.draft, NgramDraft):
            draft = self.draft
            draft.max_nodes = nodes
        else:
            self._tree_policy.max_nodes = nodes
            draft = ModelDraft(self.draft, self.draft_cost.name, warped, self.model.config.get_text_config().vocab_size,
                               self.config.speculation.width, self._tree_policy)
        stats = SpeculationStats(draft.name, expert_budget=self._expert_budget())
        self._given_back = 0  # verify passes before which the GPU allocator's cache was given back (_room_for_tree)
        clock = _StepClock(self.tracer)
        verifier = self._verifier(nodes, notes)
        if isinstance(draft, ModelDraft):
            draft.ahead = self._grows_ahead(verifier)
        with quiet_forward():
            out = speculate(verifier, draft, input_ids, max_new, chooser(do_sample, warped), ends, stats,
                            kwargs.get("streamer"), on_first_token=lambda: clock(None, None), tracer=self.tracer)
        notes.extend(self._speculation_notes(verifier, draft, stats))
        self._record(clock, decode_steps=stats.passes, new_tokens=stats.new_tokens, batch_size=1, notes=notes,
                     graph=GraphStats() if verifier.graphed else None)
        if isinstance(verifier, GraphedVerifier):
            self._graphs_read = self._resident_addresses()
        self._speculation = stats
        return out

    def _speculation_notes(self, verifier: Verifier | GraphedVerifier, draft: Any,
                           stats: SpeculationStats) -> list[str]:
        """What a speculative call's report says of how its passes and draft steps ran."""
        from .drafts import ModelDraft

        notes = []
        if isinstance(verifier, GraphedVerifier):
            failure = verifier.failure
            notes.append(f"verify passes not graphed: CUDA graph capture failed ({failure})" if failure else
                         "verify passes replayed from CUDA graphs, trees padded to "
                         f"{'/'.join(map(str, verifier.widths()))} tokens (recording them has taken "
                         f"{verifier.capture_s():.2f} s so far)")
        if self._given_back:
            notes.append(f"the GPU allocator's cached blocks were given back before {self._given_back} of "
                         f"{stats.passes} verify passes, to hold the device budget")
        if isinstance(draft, ModelDraft) and draft.ahead:
            waits = (f"; {self.experts.stats.meanwhile_s:.2f} s of them in the MoE layers' routing waits"
                     if self.experts is not None and self.experts.stats.meanwhile_s else "")
            notes.append(f"the draft grew its trees while the model verified them: {stats.carried_trees} of "
                         f"{stats.passes} passes started from a subtree grown ahead ({stats.ahead_steps} steps "
                         f"grown ahead{waits})")
        if isinstance(draft, ModelDraft) and draft.compile_failure:
            notes.append(f"draft steps not compiled: torch.compile failed ({draft.compile_failure}); they ran "
                         f"uncompiled")
        return notes

    def _grows_ahead(self, verifier: Verifier | GraphedVerifier) -> bool:
        """Whether a model draft grows its tree while the model verifies it (`speculation.ahead`); auto: on a GPU
        where the verify pass streams weights, its compute idle on the link (a resident model's graphed pass is
        launches, which the draft's steps would only delay)."""
        setting = self.config.speculation.ahead
        if setting is not None:
            return setting
        return self.device.type == "cuda" and not isinstance(verifier, GraphedVerifier)

    def _verifier(self, max_nodes: int, notes: list[str]) -> Verifier | GraphedVerifier:
        """The verify passes' runner for this call: over fixed buffers, replayed from CUDA graphs, when every unit
        stays on the device (kept for later calls); else transformers' cache, the prompt fed within the budget."""
        unfit = self._model_graph_refusal(max_nodes + 1)
        if unfit is not None:
            notes.extend([f"verify passes not graphed: {unfit}"] if unfit else [])
            budget = self._expert_budget()
            return Verifier(self.model, self.device, feed=lambda ids, cache: feed_prompt(self, ids, cache)[0].logits[0],
                            experts=self.experts, max_missed=None if budget == AUTO else budget,
                            rate=self._pass_rate if budget == AUTO else None, make_room=self._room_for_tree)
        if self._graphed_verifier is None:
            self._graphed_verifier = GraphedVerifier(self.model, self.device, max_nodes)
        self._graphed_verifier.max_nodes = max_nodes
        return self._graphed_verifier

    def _room_for_tree(self, context_tokens: int, nodes: int) -> None:
        """Before a streamed verify pass on a GPU: the allocator's cached blocks given back when they and what the
        pass takes (`tree_bytes` of its context and nodes) would pass the device budget (counted for the report)."""
        wanted = tree_bytes(self.model.config, self.model.dtype, context_tokens, nodes)
        self._given_back += give_back_cache(self.device, self.plan.device_budget_bytes, wanted)

    def forget_tree_costs(self) -> None:
        """Start the draft tree's policy afresh: the costs and acceptance it learned over earlier calls are
        forgotten (a benchmark comparing settings on one model object)."""
        self._tree_policy = TreePolicy(fixed_steps=self.config.speculation.depth)
        self._pass_rate = PassRate()  # the speculative run's tokens per second (expert_budget = auto prices by it)

    def _expert_budget(self) -> int | str | None:
        """The most missed experts a verify pass moves per MoE layer, or auto (pruned by worth):
        `speculation.expert_budget`; None without one, or without streamed experts."""
        return None if self.experts is None else self.config.speculation.expert_budget

    def _tree_nodes(self, context_tokens: int) -> int:
        """The most drafted nodes a verify pass holds in this call: `speculation.nodes`, fewer where their
        activations (each node's attention mask row over the context included), logits and KV entries would
        outgrow the device reserve's room: the activation slack and what this call's KV cache leaves of the
        reserve."""
        wanted = self.config.speculation.nodes or DEFAULT_MAX_NODES
        if not self.kv_budget.separate_device:  # on a CPU activations live in RAM, outside the device tier
            return wanted
        room = ACTIVATION_SLACK_BYTES + self.kv_budget.spare_reserve_bytes(self.plan, context_tokens)
        return tree_nodes_within(self.model.config, self.model.dtype, context_tokens, room, wanted)

    def warm_up(self) -> float:
        """One pass of one token, so that the RAM and device tiers hold what the plan puts there (read from disk
        on first use otherwise) before anyone is timed or waits; returns its seconds."""
        start_s = time.perf_counter()
        with quiet_forward():
            self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device), use_cache=False,
                       logits_to_keep=1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start_s

    def __call__(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """A plain forward (e.g. for logits), weights streamed the same way."""
        if input_ids is not None:
            self._check_input(input_ids)
            input_ids = input_ids.to(self.device)
        with quiet_forward():
            return self.model(input_ids, **kwargs)

    def report(self) -> RunReport:
        """The run report of the last `generate` call: its timing and its tier counters."""
        tiers = dict(self.store.tier_stats())
        experts = None
        if self.experts is not None:
            tiers.update({f"experts {name}": stats for name, stats in self.experts.store.tier_stats().items()})
            experts = self.experts.stats.to_dict(self.plan.experts.layers, self.plan.experts.experts_per_layer)
        notes = [*device_shares(self.plan), *self._notes]
        return RunReport(plan=self.plan, tiers=tiers, timing=self._timing, device=str(self.device),
                         setup_s=self.setup_s, notes=notes,
                         speculation=self._speculation.to_dict() if self._speculation is not None else None,
                         experts=experts, peak_rss_bytes=peak_rss_bytes(), kv=self._kv_report())

    def _kv_report(self) -> dict[str, Any] | None:
        """The last generate call's KV cache for the report (None before any): its tiers and size (the room
        placed for it), the bytes it moved per decode pass (measured for a tiered cache; transformers' offloaded
        cache copies each layer up and back), the prompt's chunk and what the prefix cache saved."""
        if self._kv_call is None or getattr(self.model.config.get_text_config(), "num_attention_heads", None) is None:
            return None  # no call yet, or a model without attention (and no KV cache)
        tokens = self._kv_call["cache_tokens"]
        nbytes = self.kv_budget.cache_bytes(tokens)
        prefixes = self._prefixes
        tiers = self._kv_call.get("tiers")
        decode = self._kv_call.get("decode")
        if decode is None:  # on the device, or the batcher's offloaded cache
            decode = {"link_bytes_per_pass": 2 * nbytes if tiers is not None else 0, "disk_bytes_per_pass": 0}
        return {"tier": describe_tiers(tiers) if tiers is not None else "device", "cache_tokens": tokens,
                "bytes": nbytes, "tier_bytes": self._kv_call.get("tier_bytes") or {"device": nbytes},
                "moved_bytes_per_pass": decode["link_bytes_per_pass"],
                "disk_bytes_per_pass": decode["disk_bytes_per_pass"],
                "prompt_chunk_tokens": self._kv_call["chunk"], "prefix_tokens_reused": self._kv_call["reused"],
                "prefix": dataclasses.asdict(prefixes.stats) if prefixes is not None else None}

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"plan {self.plan.regime}, {len(self.plan.schedule)} units"
        draft = f", draft {self.draft_cost.name if self.draft_cost else 'ngram'}" if self.draft is not None else ""
        return (f"TierstoreModel({self.model.config.model_type}, {self.device}, {self.model.dtype}, "
                f"device budget {format_size(self.plan.device_budget_bytes)}, host budget "
                f"{format_size(self.plan.host_budget_bytes)}, {state}{draft})")

    def close(self) -> None:
        """Undo what opening did, in reverse: adapters detached, the stores' threads stopped and memory freed,
        the draft closed, files closed. Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._prefixes is not None:
            self._prefixes.close()
        self._resources.close()
        self.decompressor = None
        if self.tracer is not None:
            self.tracer.write()
            self.tracer = None

    def __enter__(self) -> "TierstoreModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
