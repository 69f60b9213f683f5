"""Attention for a prompt fed in chunks: a chunk's queries see the cached tokens before them and, causally, each
other, without a mask tensor.

A chunk that does not start the sequence has fewer queries than keys. With PyTorch's SDPA, transformers then
builds the causal mask as a [batch, 1, chunk, keys] tensor, and each layer's kernel turns it into a float bias of
twice its size: 1.5 GB for a 4,096-token chunk at 128k tokens, and the kernels that take a bias are not the fastest.
Without padding that mask is plain causal aligned to the lower right, which the flash and memory-efficient kernels
compute without a tensor (`torch.nn.attention.bias.causal_lower_right`, grouped-query heads included).

While chunks run (`lower_right_chunks`), the model's attention goes through `CHUNKED`, registered with
transformers: no mask is built when no token is padding, and a chunk with fewer queries than keys attends lower-right
causally. Anything else (padding, one query, a first chunk) goes to transformers' SDPA as it would have. Models
with sliding-window or other local layers keep transformers' masks where a window is shorter than the
sequence (`takes_lower_right`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right

CHUNKED = "tierstore_chunked_sdpa"
_registered = False


def _mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' SDPA mask, or None when no token is padding: the attention below is then causal by itself."""
    from transformers.masking_utils import sdpa_mask

    padding = kwargs.get("attention_mask")
    if padding is None or bool(padding.all()):
        return None
    return sdpa_mask(*args, **kwargs)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Lower-right causal SDPA for a maskless chunk after cached tokens; transformers' SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    queries, keys = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None or not causal or queries == 1 or queries >= keys or kwargs.get("position_bias") \
            is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    bias: Any = causal_lower_right(queries, keys)
    if query.device.type == "cpu":  # no kernel there computes it without the tensor; materialized, it warns less
        bias = bias._materialize(query.device)
    groups = getattr(module, "num_key_value_groups", 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                                           scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(CHUNKED, _attention)
        AttentionMaskInterface.register(CHUNKED, _mask)
        _registered = True


def takes_lower_right(config: Any, tokens: int) -> bool:
    """Whether a model's chunks over a sequence of `tokens` can attend without a mask: SDPA attention, and every
    layer full attention or a window longer than the sequence."""
    text = config.get_text_config()
    if getattr(text, "_attn_implementation", None) != "sdpa":
        return False
    window = getattr(text, "sliding_window", None)
    if window is not None and tokens < window:
        return True  # no window reaches back past the first token
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return window is None or getattr(text, "use_sliding_window", True) is False


@contextlib.contextmanager
def lower_right_chunks(config: Any, tokens: int) -> Iterator[None]:
    """Within: the model of `config` attends through `CHUNKED` over a sequence of `tokens` (when
    `takes_lower_right`), then as before."""
    if not takes_lower_right(config, tokens):
        yield
        return
    _register()
    text = config.get_text_config()  # the decoder's layers and masks read the text config
    before = text._attn_implementation
    text._attn_implementation = CHUNKED
    try:
        yield
    finally:
        text._attn_implementation = before
