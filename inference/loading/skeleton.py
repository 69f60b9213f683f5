"""The model on the meta device, cut into store units. Architecture knowledge lives here and only here."""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from ...errors import ConfigError, ModelError
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
class ExpertGroup:
    """The routed experts of one mixture-of-experts layer, each expert a unit of its own.

    transformers keeps a layer's experts fused: each parameter of `module` (`attrs`) is a 3-D tensor with one
    slice per expert. Expert `e` is unit `keys[e]`, holding slice `e` of each, named `"<tensor>[e]"` (see
    `expert_slice`). `router`: the unit holding the layer's router weight (`router_tensor`), its own site so that
    it can stay resident and predict this layer's experts from an earlier layer's hidden state."""

    layer: str
    name: str  # the experts module's path in the model
    module: nn.Module
    attrs: tuple[tuple[str, str], ...]  # (parameter attribute, full tensor name)
    keys: tuple[str, ...]
    top_k: int
    router: str | None = None
    router_tensor: str | None = None

    @property
    def num_experts(self) -> int:
        return len(self.keys)


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """The meta model, its units (key -> parameter names) and where to hook them, in execution order.
    `matrices`: the decoder layers' weight matrices, which compression may pack (embeddings, the output layer and
    norms stay as they are, as transformers' own 4/8-bit loading leaves them). `experts`: the MoE layers whose
    experts are units of their own, fetched as the router picks them (not in the schedule)."""

    model: nn.Module
    units: dict[str, list[str]]
    sites: tuple[HookSite, ...]
    matrices: frozenset[str] = frozenset()
    experts: tuple[ExpertGroup, ...] = ()

    @property
    def schedule(self) -> list[str]:
        return [site.key for site in self.sites]

    @property
    def expert_keys(self) -> frozenset[str]:
        return frozenset(key for group in self.experts for key in group.keys)


def expert_slice(tensor: str, expert: int) -> str:
    """The name of expert `expert`'s slice of a fused experts tensor."""
    return f"{tensor}[{expert}]"


def parse_slice(name: str) -> tuple[str, int | None]:
    """(tensor, expert) for a slice name, (name, None) for a whole tensor."""
    if name.endswith("]") and "[" in name:
        tensor, index = name[:-1].rsplit("[", 1)
        if index.isdigit():
            return tensor, int(index)
    return name, None


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
                   attn_implementation: str | None = None, split_experts: bool = False,
                   experts_implementation: str | None = None) -> Skeleton:
    """Build the model with parameters on `meta` (buffers real, on the CPU) and find its units. Attention is
    transformers' choice for the architecture unless `attn_implementation` names one ("auto" or None: choose).
    `split_experts`: each routed expert of a mixture-of-experts layer is a unit of its own (see ExpertGroup);
    `experts_implementation`: transformers' kernel for the experts ("grouped_mm", "batched_mm", "eager")."""
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
    if experts_implementation not in (None, "auto") and any(_dispatches_experts(m) for m in model.modules()):
        model.set_experts_implementation(experts_implementation)
    model.tie_weights()  # not done on meta by from_config; tied weights become one unit below
    model.eval()
    model.requires_grad_(False)
    layers = decoder_layers(model, config)
    return _cut(model, layers, _expert_modules(model, layers[0], config) if split_experts else {})


def _expert_modules(model: nn.Module, layers_name: str, config: object) -> dict[str, tuple[str | None, int]]:
    """Fused experts modules of the decoder layers, by name, with their router's name (None if not found) and top
    k. An experts module is one transformers dispatches through its experts interface (`use_experts_implementation`:
    called with the hidden states, the routed indices and their weights); other layouts stay inside their layer,
    as do experts shaped unlike the first layer's (the device slots hold experts of one shape)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    top_k = getattr(text, "num_experts_per_tok", None) or getattr(text, "moe_topk", None)
    found: dict[str, tuple[str | None, int]] = {}
    shape = None
    for name, module in model.named_modules():
        if not (name.startswith(layers_name + ".") and _dispatches_experts(module) and isinstance(top_k, int)
                and 0 < top_k <= module.num_experts):
            continue
        count = module.num_experts
        fused = [(p.dtype, tuple(p.shape[1:])) for p in module._parameters.values()
                 if p is not None and p.dim() >= 1 and p.shape[0] == count]
        if shape is None:
            shape = fused
        if fused != shape:
            continue
        parent_name = name.rsplit(".", 1)[0]
        router = next((f"{parent_name}.{child}" for child, sub in model.get_submodule(parent_name).named_children()
                       if sub is not module and getattr(sub, "weight", None) is not None
                       and sub.weight.dim() == 2 and sub.weight.shape[0] == count), None)
        found[name] = (router, top_k)
    return found


def decoder_layers(model: nn.Module, config: object) -> tuple[str, nn.ModuleList]:
    """The decoder layers' ModuleList and its path in `model` (the one of `num_hidden_layers` modules)."""
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


def _dispatches_experts(module: nn.Module) -> bool:
    """Whether `module` is a fused experts module behind transformers' experts interface: parameters with one
    slice per expert, and its class's forward wrapped (`use_experts_implementation`) around one taking the hidden
    states, the routed indices and their weights."""
    count = getattr(module, "num_experts", None)
    forward = type(module).forward
    if not isinstance(count, int) or getattr(forward, "__wrapped__", None) is None:
        return False
    if not any(p is not None and p.dim() >= 1 and p.shape[0] == count for p in module._parameters.values()):
        return False
    return len(inspect.signature(forward).parameters) >= 4  # self, hidden states, indices, weights


def _cut(model: nn.Module, layers: tuple[str, nn.ModuleList],
         experts: dict[str, tuple[str | None, int]]) -> Skeleton:
    """Units: one per decoder layer, one per other module owning parameters, and for each experts module in
    `experts` one per expert plus one for its router. Tied weights resolved here, once."""
    layers_name, layer_list = layers
    prefix = layers_name + "."
    canonical: dict[int, tuple[str, str]] = {}  # id(param) -> (tensor name, unit key)
    units: dict[str, list[str]] = {}
    matrices: set[str] = set()
    site_bindings: dict[str, list[Binding]] = {}
    site_modules: dict[str, nn.Module] = {name: layer for name, layer in
                                         ((f"{layers_name}.{i}", layer) for i, layer in enumerate(layer_list))}
    routers = {router: name for name, (router, _) in experts.items() if router is not None}
    fused: dict[str, list[tuple[str, str]]] = {name: [] for name in experts}
    for module_name, module, attr, param in _owned_parameters(model):
        tensor = f"{module_name}.{attr}" if module_name else attr
        if module_name in experts and param.dim() >= 1 and param.shape[0] == module.num_experts:
            fused[module_name].append((attr, tensor))  # sliced into expert units below
            continue
        if module_name in routers:
            site = module_name
            site_modules.setdefault(site, module)
        elif module_name.startswith(prefix):
            site = prefix + module_name[len(prefix):].split(".", 1)[0]
        else:
            site = module_name
            site_modules.setdefault(site, module)
        if id(param) not in canonical:
            canonical[id(param)] = (tensor, _unit_key(site, layers_name))
            units.setdefault(_unit_key(site, layers_name), []).append(tensor)
            # a router stays as it is: a unit of its own, read whole to predict the next layer's experts
            if module_name.startswith(prefix) and param.dim() >= 2 and param.is_floating_point() \
                    and module_name not in routers:
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
    groups = [_expert_group(model, name, router, top_k, fused[name], layers_name, units, matrices,
                            router in site_bindings) for name, (router, top_k) in experts.items()]
    return Skeleton(model, units, tuple(sites), frozenset(matrices), tuple(groups))


def _expert_group(model: nn.Module, name: str, router: str | None, top_k: int, fused: list[tuple[str, str]],
                  layers_name: str, units: dict[str, list[str]], matrices: set[str], router_bound: bool) -> ExpertGroup:
    """The experts module `name` as a group of expert units, added to `units` (each expert's slice of a fused
    weight, 3-D: experts, rows, columns, added to `matrices`, which compression may pack)."""
    module = model.get_submodule(name)
    prefix = layers_name + "."
    layer = _unit_key(prefix + name[len(prefix):].split(".", 1)[0], layers_name)
    keys = tuple(f"{layer}.experts.{e}" for e in range(module.num_experts))
    for e, key in enumerate(keys):
        units[key] = [expert_slice(tensor, e) for _, tensor in fused]
        matrices.update(expert_slice(tensor, e) for attr, tensor in fused
                        if module._parameters[attr].dim() >= 3 and module._parameters[attr].is_floating_point())
    router_key = _unit_key(router, layers_name) if router is not None and router_bound else None
    return ExpertGroup(layer, name, module, tuple(fused), keys, top_k, router_key,
                       f"{router}.weight" if router_key is not None else None)


def _unit_key(site: str, layers_name: str) -> str:
    """Short, file-name-safe unit keys: layers.3, layers.3.mlp.gate (a router), embed_tokens, norm, lm_head."""
    if site.startswith(layers_name + "."):
        return "layers." + site[len(layers_name) + 1:]
    return site.split(".", 1)[1] if site.startswith("model.") else site
