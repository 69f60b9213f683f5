"""Module adapters: the one way tierstore changes the skeleton's modules while a model is open.

An adapter changes modules when it is made (hooks registered, a forward replaced, parameters bound), and its
`detach()` puts every module back exactly as it was, as accelerate's `add_hook_to_module` and
`remove_hook_from_module` do. The composer (compose.py) attaches them in one order and hands each detach to the
model's resource stack, which undoes them in the reverse order when the model closes (or when opening fails):
- `hooks.AttachedHooks`: each unit's tensors lent to its module around its forward (every model);
- `lookup.HostLookup`: the input embedding's forward answered from host RAM (a table the RAM budget holds);
- `experts.ExpertRunner`: each MoE layer's experts module run on the device slots of the routed experts;
- `collectives.Collectives`: the ranks' outputs combined after the modules they split (tensor parallelism);
- `fused_norms.FusedNorms`: transformers' RMSNorm modules run by torch's fused rms_norm;
- `fused_rotary.FusedRotary`: the rotary embedding of transformers' attention layers in one kernel on a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Protocol, TypeVar


class ModuleAdapter(Protocol):
    """Changed the modules it adapts when it was made; `detach` restores them."""

    def detach(self) -> None: ...


Adapter = TypeVar("Adapter", bound=ModuleAdapter)


def attach(resources: contextlib.ExitStack, adapter: Adapter) -> Adapter:
    """Hand `adapter`'s detach to `resources` (undone in reverse order of attaching); returns `adapter`."""
    resources.callback(adapter.detach)
    return adapter
