"""The model on the meta device, cut into store units. Architecture knowledge lives here and only here."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .checkpoint import check_remote_code


@dataclasses.dataclass(frozen=True)
class Binding:
    """One parameter slot of a module, filled with a unit's tensor while the module runs."""

    module: nn.Module
    attr: str
    tensor: str
    original: nn.Parameter


@dataclasses.dataclass(frozen=True)
class HookSite:
    """A module whose forward needs one unit; `position` is its place in the schedule of one pass. `bind_from`:
    a module whose forward starts earlier and must already see the weights (the input embedding's parent, which
    some models ask for the embedding's device before calling it); they stay bound until the site's forward ends,
    or, if it never runs, until `bind_from`'s does."""

    module: nn.Module
    key: str
    position: int
    bindings: tuple[Binding, ...]
    bind_from: nn.Module | None = None


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """The meta model, its units (key -> parameter names) and where to hook them, in execution order.
    `matrices`: the decoder layers' weight matrices, which compression may pack (embeddings, the output layer and
    norms stay as they are, as transformers' own 4/8-bit loading leaves them)."""

    model: nn.Module
    units: dict[str, list[str]]
    sites: tuple[HookSite, ...]
    matrices: frozenset[str] = frozenset()

    @property
    def schedule(self) -> list[str]:
        return [site.key for site in self.sites]


def check_architecture(config: object, trust_remote_code: bool) -> None:
    """Refuse what the layer loop cannot run, naming the architecture."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None) or [model_type]
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{architectures[0]} is an encoder-decoder model; tierstore runs decoder-only models")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and \
            check_remote_code(getattr(config, "auto_map", None), architectures[0], trust_remote_code):
        return
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"architecture {architectures[0]} (model_type {model_type!r}) is not a decoder-only "
                         f"causal LM that transformers knows")


def supported_attention(config: object) -> list[str]:
    """The attention implementations transformers' class for `config` declares it supports."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    supported = ["eager"]
    if getattr(model_class, "_supports_sdpa", False):
        supported.append("sdpa")
    if getattr(model_class, "_supports_flash_attn", False):
        supported += ["flash_attention_2", "flash_attention_4"]
    return supported


def _architecture(config: object) -> str:
    return (getattr(config, "architectures", None) or [getattr(config, "model_type", "this model")])[0]


def build_skeleton(config: object, dtype: torch.dtype, trust_remote_code: bool = False,
                   attn_implementation: str | None = None) -> Skeleton:
    """Build the model with parameters on `meta` (buffers real, on the CPU) and find its units. Attention is
    transformers' choice for the architecture unless `attn_implementation` names one ("auto" or None: choose)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    check_architecture(config, trust_remote_code)
    chosen = {} if attn_implementation in (None, "auto") else {"attn_implementation": attn_implementation}
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **chosen)
    except (ValueError, ImportError) as exc:
        if not chosen or "attention" not in str(exc):
            raise
        raise ConfigError(f"runtime.attention = {attn_implementation!r}: {_architecture(config)} does not support "
                          f"it; it supports {', '.join(supported_attention(config))}") from exc
    model.tie_weights()  # not done on meta by from_config; tied weights become one unit below
    model.eval()
    model.requires_grad_(False)
    return _cut(model, _decoder_layers(model, config))


def _decoder_layers(model: nn.Module, config: object) -> tuple[str, nn.ModuleList]:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text_config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ModelError(f"{type(model).__name__}: no ModuleList of {count} decoder layers found; "
                     f"this layout is not supported")


def _owned_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                yield module_name, module, attr, param


def _cut(model: nn.Module, layers: tuple[str, nn.ModuleList]) -> Skeleton:
    """Units: one per decoder layer, one per other module owning parameters. Tied weights resolved here, once."""
    layers_name, layer_list = layers
    prefix = layers_name + "."
    canonical: dict[int, tuple[str, str]] = {}  # id(param) -> (tensor name, unit key)
    units: dict[str, list[str]] = {}
    matrices: set[str] = set()
    site_bindings: dict[str, list[Binding]] = {}
    site_modules: dict[str, nn.Module] = {name: layer for name, layer in
                                         ((f"{layers_name}.{i}", layer) for i, layer in enumerate(layer_list))}
    for module_name, module, attr, param in _owned_parameters(model):
        tensor = f"{module_name}.{attr}" if module_name else attr
        if module_name.startswith(prefix):
            site = prefix + module_name[len(prefix):].split(".", 1)[0]
        else:
            site = module_name
            site_modules.setdefault(site, module)
        if id(param) not in canonical:
            canonical[id(param)] = (tensor, _unit_key(site, layers_name))
            units.setdefault(_unit_key(site, layers_name), []).append(tensor)
            if module_name.startswith(prefix) and param.dim() >= 2 and param.is_floating_point():
                matrices.add(tensor)
        tensor, key = canonical[id(param)]
        site_bindings.setdefault(site, []).append(Binding(module, attr, tensor, param))
    order = [name for name, _ in model.named_modules() if name in site_bindings]
    embedding = model.get_input_embeddings()
    sites = []
    for position, site in enumerate(order):
        keys = {canonical[id(b.original)][1] for b in site_bindings[site]}
        if len(keys) != 1:
            raise ModelError(f"module {site!r} uses parameters of several units ({sorted(keys)}); "
                             f"this layout is not supported")
        bind_from = model.get_submodule(site.rsplit(".", 1)[0]) if site_modules[site] is embedding and "." in site \
            else None
        sites.append(HookSite(site_modules[site], keys.pop(), position, tuple(site_bindings[site]), bind_from))
    return Skeleton(model, units, tuple(sites), frozenset(matrices))


def _unit_key(site: str, layers_name: str) -> str:
    """Short, file-name-safe unit keys: layers.3, embed_tokens, norm, lm_head."""
    if site.startswith(layers_name + "."):
        return "layers." + site[len(layers_name) + 1:]
    return site.split(".", 1)[1] if site.startswith("model.") else site
