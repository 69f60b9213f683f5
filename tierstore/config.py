"""Config: a TOML file or a dict, validated once into frozen objects. Errors name the key, value and choices."""
from __future__ import annotations

import dataclasses
import os

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from collections.abc import Callable, Mapping
from typing import Any

from .budget import Budget
from .errors import BudgetError, ConfigError
from .policies.dense import RESIDENT_ORDERS
from .policies.experts import COMPUTE_MODES, EXPERT_POLICIES
from .policies.registry import EVICTION_POLICIES, PREFETCH_POLICIES
from .sizes import parse_size

AUTO = "auto"


def _choice(*allowed: str) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose from {', '.join(allowed)}")
        return value
    return check


def _int_or(word: str, minimum: int) -> Callable[[str, Any], Any]:
    """An integer >= `minimum`, or `word` (auto, none), which means None."""
    def check(key: str, value: Any) -> Any:
        if value == word:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}: {value!r} is not allowed; use an integer >= {minimum} or \"{word}\"")
        return value
    return check


def _int_none_or_auto(minimum: int) -> Callable[[str, Any], Any]:
    """An integer >= `minimum`, "none" (None) or "auto" (kept as the word)."""
    number = _int_or("none", minimum)

    def check(key: str, value: Any) -> Any:
        if value == AUTO:
            return AUTO
        try:
            return number(key, value)
        except ConfigError:
            raise ConfigError(f"{key}: {value!r} is not allowed; use an integer >= {minimum}, \"none\" or "
                              f"\"{AUTO}\"") from None
    return check


def _int(minimum: int) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}: {value!r} is not allowed; use an integer >= {minimum}")
        return value
    return check


def _float_range(low: float, high: float) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ConfigError(f"{key}: {value!r} is not allowed; use a number from {low:g} to {high:g}")
        return float(value)
    return check


def _bool(key: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not allowed; use true or false")
    return value


def _bool_or_auto(key: str, value: Any) -> Any:
    return None if value == AUTO else _bool(key, value)


def _size_or_none(key: str, value: Any) -> Any:
    if value is None or value == AUTO:
        return None
    try:
        return parse_size(value, key, ConfigError)
    except BudgetError as exc:  # pragma: no cover - parse_size raises the error class it is given
        raise ConfigError(str(exc)) from exc


def _path(key: str, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: {value!r} is not allowed; use a directory path")
    return os.path.expanduser(value)


def _file_or_none(key: str, value: Any) -> Any:
    if value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key}: {value!r} is not allowed; use a file path, or \"\" for none")
    return os.path.expanduser(value)


def _device(key: str, value: Any) -> Any:
    if not isinstance(value, str) or not (value in (AUTO, "cpu", "cuda") or value.startswith("cuda:")
                                          and value[5:].isdigit()):
        raise ConfigError(f"{key}: {value!r} is not allowed; use auto, cpu, cuda or cuda:N")
    return value


COMPRESSION_FORMATS = ("nf4", "int8", "q2_k", "q3_k", "q4_k", "q4_k_m", "q5_k", "q6_k", "q8_0", "mixed")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_4")  # transformers' names
TFLOAT32 = "tfloat32"  # a float32 draft whose matrix products run on TF32 tensor cores
DRAFT_DTYPES = (AUTO, "float32", TFLOAT32, "bfloat16", "float16")  # speculation.draft_dtype
EXPERT_KERNELS = ("grouped_mm", "batched_mm", "eager")  # transformers' experts_implementation names
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' block-wise kernels accept


def _blocksize(key: str, value: Any) -> Any:
    if value == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value not in BLOCKSIZES:
        raise ConfigError(f"{key}: {value!r} is not allowed; use {', '.join(map(str, BLOCKSIZES))} or \"auto\"")
    return value


_EVICTION = (AUTO, *sorted(EVICTION_POLICIES))
_PREFETCH = (AUTO, *sorted(PREFETCH_POLICIES))

# section -> key -> (validator, default as written in TOML, what it does). The README documents the same table.
SCHEMA: dict[str, dict[str, tuple[Callable[[str, Any], Any], Any, str]]] = {
    "budget": {
        "vram": (_size_or_none, AUTO, "device tier bytes; auto = free VRAM (on a CPU, half of available RAM)"),
        "ram": (_size_or_none, AUTO, "host tier bytes; auto = available RAM (on a CPU, the other half)"),
        "disk": (_size_or_none, AUTO, "disk tier bytes for converted stores; auto = free disk"),
    },
    "policy": {
        "device": (_choice(*_EVICTION), AUTO, "eviction policy of the device tier; auto = static (planner)"),
        "host": (_choice(*_EVICTION), AUTO, "eviction policy of the host tier; auto = static (planner)"),
        "prefetch": (_choice(*_PREFETCH), AUTO, "prefetch policy; auto = lookahead"),
        "prefetch_depth": (_int_or(AUTO, 0), AUTO, "units loaded ahead of the one computing; auto = planned"),
        "resident_order": (_choice(*RESIDENT_ORDERS), "spread", "which of equal units stay resident when not all fit: "
                                                                  "spread over the pass, or the first ones"),
    },
    "io": {
        "reader_threads": (_int(1), 4, "threads reading units from disk"),
        "direct_io": (_bool_or_auto, AUTO, "bypass the page cache with O_DIRECT (GPU runs); auto = where supported"),
        "pinned_memory": (_bool, True, "keep the host tier in pinned memory when CUDA is present"),
        "verify_checksums": (_bool, True, "check each unit read from a converted store against its checksum"),
    },
    "compression": {
        "format": (_choice("none", *COMPRESSION_FORMATS), "none",
                   "store the decoder layers' matrices block-wise: nf4 or int8 (bitsandbytes), or GGML's k-quants "
                   "quantized by tierstore (q2_k, q3_k, q4_k, q4_k_m, q5_k, q6_k, q8_0), or mixed: a k-quant per "
                   "matrix chosen by its measured error to meet compression.bits; none = as is"),
        "bits": (_float_range(2.625, 8.5), 4.5,
                 "mixed: bits per weight (2.625 to 8.5) the decoder matrices' formats meet together, the matrices "
                 "whose error weighs most (on the calibration text, when one is given) keeping the most"),
        "blocksize": (_blocksize, AUTO, "elements per quantization block (64 to 4096); auto = 64 for nf4, 256 "
                                        "for int8"),
        "calibration": (_file_or_none, "", "the GGML formats (q4_k, ...): \"bundled\" or a text file whose "
                                           "activations weigh each weight's error (an importance matrix, measured "
                                           "with the model uncompressed when the store is written); \"\" = none, "
                                           "data-free"),
        "rounding": (_choice("nearest", "gptq"), "nearest",
                     "the GGML formats with a calibration text: how each weight's code is chosen; nearest = its "
                     "nearest level, the levels searched with the importance matrix; gptq = column by column, each "
                     "column's error folded into the columns not yet rounded, fitted to the calibration text's "
                     "activations (GPTQ): the same blocks and bits, less output error, minutes more to write"),
        "rotation": (_choice("none", "hadamard"), "none",
                     "the GGML formats tierstore quantizes (mixed too), with rounding = gptq: hadamard = each "
                     "matrix's inputs turned by random signs and a 64-wide Hadamard transform before it is "
                     "quantized, and the matrix turned back as it is dequantized (QuIP-style incoherence): helps at "
                     "3 bits, can hurt at 4 (measured: README); none = as is"),
        "gguf": (_choice(AUTO, "packed", "dequantized"), AUTO,
                 "a GGUF's quantized layer matrices: kept in the file's formats in every tier and dequantized where "
                 "they compute (packed), or stored dequantized; auto = packed on a GPU, dequantized on a CPU "
                 "(no link to save bytes on, and its dequantization costs more than it saves)"),
    },
    "speculation": {
        "width": (_int(1), 8, "draft tree: the most nodes a draft step adds (the most likely candidates anywhere in "
                              "the tree), and candidates per node; above 8, a step runs over 8, 16, ... slots up to "
                              "it, the narrowest holding what the tree policy takes, each width's cost measured "
                              "(a CPU replay with a GPU's costs: 32 raised the median 7B prompt and lowered the best "
                              "one: README); an ngram draft proposes at most min(8, width) continuations"),
        "depth": (_int_or(AUTO, 1), AUTO, "draft steps per pass; auto = as many as pay (measured verify and step "
                                          "costs)"),
        "nodes": (_int_or(AUTO, 1), AUTO, "most drafted nodes a tree holds; auto = 1024, fewer where a verify pass's "
                                          "activations would outgrow the device reserve"),
        "ngram": (_int(1), 3, "ngram draft: longest n-gram matched"),
        "draft_dtype": (_choice(*DRAFT_DTYPES), AUTO,
                        "a model draft's dtype; auto = the model's. float32 costs the device twice a bfloat16 "
                        "draft's bytes, and helps where the draft computes what the model does (a matched draft): "
                        "two bfloat16 copies of one function round apart at near-ties and the tree ends there (on "
                        "an H100, the real-language MoE proxy's prompt 0: 85 tokens a pass against 28, but each "
                        "step 2.5x slower; a float32 draft on a GPU attends eagerly unless runtime.attention names "
                        "a kernel; README, Speculative decoding). tfloat32 = float32 whose matrix products run on a "
                        "GPU's TF32 tensor cores (inputs rounded to 10 mantissa bits, float32 sums): a CPU replay "
                        "kept float32's tokens a pass"),
        "compile": (_bool, False, "a model draft's steps: its weights bound once (a compressed draft's unpacked, "
                                  "which the device budget then pays for) and its forward compiled by "
                                  "torch.compile before the CUDA graph records it, fusing each layer's small "
                                  "kernels; the first call pays the compile"),
        "ahead": (_bool_or_auto, False, "a model draft keeps growing its tree while the model's verify pass runs "
                                        "(its steps issued between the pass's launch and its read-back, and in a "
                                        "pass whose experts stream at each MoE layer's routing read-back, on the "
                                        "draft's own stream), and a pass whose bonus token that grown tree holds "
                                        "starts the next tree from its subtree, already drafted; the draft's KV "
                                        "cache then holds a second tree; auto = on a GPU where the verify pass "
                                        "streams weights. Off by default: not yet measured on a GPU in this form "
                                        "(README, Speculative decoding)"),
        "expert_budget": (_int_none_or_auto(1), "none",
                          "mixture-of-experts models with streamed experts: the most experts not in device slots "
                          "that a verify pass moves (copies or computes on the host) per MoE layer, the tree pruned "
                          "to it best node first; auto = each node kept while the tokens it (with its subtree) is "
                          "expected to give are worth the measured time of the missed experts it alone adds, at "
                          "the run's tokens per second; none = no budget (the tree's size alone decides, as "
                          "measured verify costs say)"),
    },
    "experts": {
        "streaming": (_bool, True, "mixture-of-experts models: each routed expert is a unit of its own, moved only "
                                   "when a token is routed to it (compressed experts cross packed and are "
                                   "dequantized on the device); false = whole layers"),
        "device_policy": (_choice(AUTO, *EXPERT_POLICIES), AUTO,
                          "eviction policy of the experts cached on the device; auto = lfu (frequency with decay)"),
        "host_policy": (_choice(AUTO, *EXPERT_POLICIES), AUTO,
                        "eviction policy of the experts kept in host RAM; auto = lfu (frequency with decay)"),
        "prefetch": (_choice(AUTO, "router", "none"), AUTO,
                     "router = run the next MoE layer's router on the current hidden state and start copying the "
                     "experts it picks; auto = router while at least half of the experts it copies are used"),
        "compute": (_choice(AUTO, *COMPUTE_MODES), AUTO,
                    "where an expert routed to but not on the device is computed: device = copied over the link "
                    "into a slot; host = by the CPU from host RAM (the token's hidden state crosses the link, not "
                    "the weights); mapped = read in place by the GPU from page-locked host RAM, no copy and no "
                    "wait for the routing (layer calls of up to 32 token-expert pairs, as in decoding; host RAM "
                    "must hold every expert; compressed experts are read packed and dequantized on the device); "
                    "auto = mapped for decode steps on a GPU once every expert is in pinned RAM (compressed ones "
                    "where all are stored alike), else split per layer by measured rates so that link and CPU work "
                    "at once (on a CPU: host)"),
        "implementation": (_choice(AUTO, *EXPERT_KERNELS), AUTO,
                           "transformers' experts kernel; auto = grouped_mm under expert streaming (the fastest on "
                           "GPUs, and exact there: eager sums a token's experts in slot order), else transformers' "
                           "default"),
    },
    "runtime": {
        "device": (_device, AUTO, "compute device: auto, cpu, cuda or cuda:N"),
        "attention": (_choice(AUTO, *ATTENTION), AUTO,
                      "attention kernels: auto = transformers' choice for the architecture (sdpa where it supports "
                      "it, else eager); sdpa (PyTorch's, flash kernels on a GPU), eager, flash_attention_2 "
                      "(flash-attn) or flash_attention_4 (flash-attn-4, Hopper and Blackwell GPUs)"),
        "device_reserve": (_size_or_none, AUTO, "device bytes kept for activations and KV cache; auto = estimated"),
        "kv_cache": (_choice(AUTO, "device", "host", "disk"), AUTO,
                     "where a GPU run's KV cache lives: auto = in the device reserve when the device budget holds it "
                     "beside the weights, else layer by layer in host RAM and, past the RAM budget, on disk "
                     "(fetched a layer ahead); device; host (more of the device budget for weights); disk (every "
                     "layer in kv_dir, on a CPU too)"),
        "kv_dir": (_file_or_none, "", "where KV cache layers on disk go (files removed as soon as opened); "
                                      "\"\" = kv under cache_dir"),
        "prefill_chunk": (_int_or(AUTO, 1), AUTO,
                          "prompt tokens fed per weight pass; auto = the whole prompt while its activations are small, "
                          "else chunks as large as the device budget holds beside the KV cache"),
        "prefix_cache_ram": (_size_or_none, "2GB",
                             "host RAM for finished sequences' KV caches, reused by later prompts that start the same "
                             "way (a server keeps them there; beside the budgets; taken, and pinned on a GPU, when "
                             "the cache opens); 0 = none"),
        "prefix_cache_dir": (_file_or_none, "", "a directory keeping those KV caches on disk too, across runs "
                                                "(generate reuses prefixes only when one is given); \"\" = none"),
        "prefix_cache_disk": (_size_or_none, "16GB", "the most bytes that directory takes (least recently used "
                                                     "entries removed first)"),
        "cache_dir": (_path, "~/.cache/tierstore", "where converted layer stores are written"),
        "trace": (_file_or_none, "", "write a timeline of reads, copies, compute and stalls here (Chrome trace "
                                     "JSON, for Perfetto or `tierstore plot`); \"\" = no trace"),
        "fused_norms": (_choice(AUTO, "off"), AUTO,
                        "auto = transformers' RMSNorm (Llama's and the classes copied from it) runs torch's fused "
                        "rms_norm: two kernels where its forward launches eight, the same values up to the order of "
                        "the mean's sum; off = transformers' forward"),
        "fused_rotary": (_choice(AUTO, "off"), AUTO,
                         "auto = on a GPU, transformers' rotary embedding (Llama's apply_rotary_pos_emb and the "
                         "modules copying it) runs one kernel for a layer's queries and keys where it launches ten, "
                         "the same values bit for bit; off = transformers' function"),
        "cuda_graphs": (_choice(AUTO, "resident", "off"), AUTO,
                        "replay decode steps from CUDA graphs on a GPU: auto = a whole step's graph when every unit "
                        "and the KV cache stay on the device, else each decoder layer's own graph, a streamed one's "
                        "while its units land where it was recorded (the report says why not otherwise, and a "
                        "failed capture runs eagerly); resident = as auto, but only the layers kept on the device "
                        "get graphs of their own; off = never"),
    },
}


def _frozen(section: str) -> type:
    fields = [(key, Any, dataclasses.field(default=None)) for key in SCHEMA[section]]
    return dataclasses.make_dataclass(f"{section.title()}Config", fields, frozen=True)


PolicyConfig = _frozen("policy")
IOConfig = _frozen("io")
CompressionConfig = _frozen("compression")
SpeculationConfig = _frozen("speculation")
ExpertsConfig = _frozen("experts")
RuntimeConfig = _frozen("runtime")


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated, immutable settings. Build with `Config.load` (path, dict, Config or None)."""

    budget: Budget
    policy: Any
    io: Any
    compression: Any
    runtime: Any
    speculation: Any
    experts: Any

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "Config":
        """Validate a nested dict shaped like the TOML file."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a table of sections, got {type(data).__name__}")
        for section in data:
            if section not in SCHEMA:
                raise ConfigError(f"{source}: unknown section [{section}]; allowed: {', '.join(SCHEMA)}")
        values: dict[str, dict[str, Any]] = {}
        for section, keys in SCHEMA.items():
            given = data.get(section, {})
            if not isinstance(given, Mapping):
                raise ConfigError(f"{source}: [{section}] must be a table, got {given!r}")
            for key in given:
                if key not in keys:
                    raise ConfigError(f"{source}: unknown key {section}.{key}; allowed: {', '.join(keys)}")
            values[section] = {key: check(f"{section}.{key}", given.get(key, default))
                               for key, (check, default, _) in keys.items()}
        return cls(budget=Budget(**values["budget"]), policy=PolicyConfig(**values["policy"]),
                   io=IOConfig(**values["io"]), compression=CompressionConfig(**values["compression"]),
                   runtime=RuntimeConfig(**values["runtime"]),
                   speculation=SpeculationConfig(**values["speculation"]),
                   experts=ExpertsConfig(**values["experts"]))

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> "Config":
        """Read and validate a TOML file; a syntax error names the file and line."""
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {os.fspath(path)!r} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {os.fspath(path)!r}: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {os.fspath(path)!r} cannot be read: {exc}") from exc
        return cls.from_dict(data, source=os.fspath(path))

    @classmethod
    def load(cls, config: "Config | Mapping[str, Any] | str | os.PathLike[str] | None") -> "Config":
        """Accept what users pass: None (defaults), a dict, a TOML path or a Config."""
        if isinstance(config, Config):
            return config
        if config is None:
            return cls.from_dict({})
        if isinstance(config, (str, os.PathLike)):
            return cls.from_toml(config)
        return cls.from_dict(config)

    def with_budget(self, budget: Budget | Mapping[str, Any] | None) -> "Config":
        """This config with the budget fields that `budget` (a Budget or a dict of them) sets replaced."""
        budget = Budget.coerce(budget)
        if budget is None:
            return self
        merged = {name: getattr(budget, name) if getattr(budget, name) is not None else getattr(self.budget, name)
                  for name in ("vram", "ram", "disk")}
        return dataclasses.replace(self, budget=Budget(**merged))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The validated values, JSON-serialisable (None means auto)."""
        return {"budget": self.budget.to_dict(), "policy": dataclasses.asdict(self.policy),
                "io": dataclasses.asdict(self.io), "compression": dataclasses.asdict(self.compression),
                "runtime": dataclasses.asdict(self.runtime), "speculation": dataclasses.asdict(self.speculation),
                "experts": dataclasses.asdict(self.experts)}

    @property
    def splits_experts(self) -> bool:
        """Whether mixture-of-experts layers are cut into one unit per expert (compressed or not: a compressed
        expert crosses the link packed and is dequantized on the device as it is routed to)."""
        return bool(self.experts.streaming)

    def without_expert_streaming(self) -> "Config":
        """This config with `experts.streaming` off."""
        return dataclasses.replace(self, experts=dataclasses.replace(self.experts, streaming=False))

    def with_compression(self, format: str | None) -> "Config":
        """This config with `compression.format` replaced (None keeps it); validated like the file's value."""
        if format is None:
            return self
        value = SCHEMA["compression"]["format"][0]("compression.format", format)
        return dataclasses.replace(self, compression=dataclasses.replace(self.compression, format=value))

    def data_free(self) -> "Config":
        """This config without what only the GGML recipes take: a calibration text (and so with nearest rounding)
        and a rotation."""
        return dataclasses.replace(self, compression=dataclasses.replace(self.compression, calibration=None,
                                                                         rounding="nearest", rotation="none"))
