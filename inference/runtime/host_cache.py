"""The KV cache in host RAM: transformers' offloaded `DynamicCache`, made safe to stream beside the weights.

After a layer's update, the offloaded cache copies that layer back to host memory on the compute stream, and it
fetches the next layer ahead on a stream of its own. Before transformers 5.20 the fetch did not wait for the
compute stream, so it could read a layer's host copy before the copy back had run. With the weights streamed, the
compute stream runs far behind the Python that queues it, and that happened. On an H200 with transformers 5.17, a
7B model's logits differed from the device cache's by up to 9 from the second token on. `HostKVCache` makes the
fetch wait in every release; from 5.20 on, transformers waits as well and the second wait costs nothing.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


class HostKVCache(DynamicCache):
    """transformers' offloaded DynamicCache whose prefetch waits for the compute queued before it."""

    def __init__(self, config: Any) -> None:
        super().__init__(config=config, offloading=True)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.prefetch_stream.wait_stream(torch.cuda.default_stream(key_states.device))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)
