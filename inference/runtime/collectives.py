"""Tensor parallelism at run time: joining the ranks' process group (torch.distributed: NCCL on GPUs, gloo on
CPUs), and the module adapter that combines the ranks' split outputs (see loading/shards.py for the split)."""
from __future__ import annotations

import atexit
import datetime
import os
from typing import Any

import torch
from torch import nn

from ...errors import InputError
from ..loading.splits import Group

TIMEOUT_S = 300  # a collective waiting longer than this ends the run (a rank died, or hangs)


def launched_world() -> int | None:
    """The number of ranks torchrun (or `--tp`) started this process among, None outside such a launch."""
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world else None


def join_group(world: int, device: torch.device, timeout_s: float) -> Group:
    """Join the ranks this process was launched among (the environment torchrun sets); every collective gives up
    after `timeout_s`, so a rank that died ends the others instead of hanging them."""
    import torch.distributed as dist

    launched = launched_world()
    if launched is None:
        raise InputError(f"tensor_parallel={world} runs one process per device: start them with "
                         f"`tierstore generate --tp {world}` or `torchrun --nproc-per-node {world}`")
    if launched != world:
        raise InputError(f"tensor_parallel={world}, but {launched} processes were launched (WORLD_SIZE)")
    owned = not dist.is_initialized()
    if owned:
        # Imported after the group is up, torch._dynamo (which transformers imports) keeps it alive past
        # destroy_process_group, and its threads then abort the process at exit: import it first.
        import torch._dynamo  # noqa: F401
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        atexit.register(leave_group)  # also when opening the model fails after this
    return Group(dist.get_rank(), dist.get_world_size(), owned)


def leave_group() -> None:
    """End the process group, if one is up: its threads must not outlive the interpreter (gloo aborts the
    process when they do, turning a clean exit code into SIGABRT)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """On GPUs, the launch's local rank picks the device; on a CPU every rank computes on the CPU."""
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local >= count:
        raise InputError(f"rank {local} of this host has no GPU: {count} GPUs here")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


class Collectives:
    """The hooks that combine split outputs: a sum over the ranks after a rowwise module, the gathered logits
    after the LM head, and the embedding's rows summed after each rank embedded the ids in its vocabulary slice.
    Attached when made; `detach` removes them (the process group is the composer's to end, see `leave_group`)."""

    def __init__(self, styles: dict[nn.Module, str], group: Group) -> None:
        self.group = group
        self._handles = []
        for module, style in styles.items():
            if style == "rowwise":
                self._handles.append(module.register_forward_hook(_all_reduce))
            elif style == "rowwise_split_input":
                columns = module.in_features // group.world
                self._handles.append(module.register_forward_pre_hook(
                    lambda m, args, columns=columns: (args[0].narrow(-1, group.rank * columns, columns), *args[1:])))
                self._handles.append(module.register_forward_hook(_all_reduce))
            elif style == "colwise_gather_output":
                self._handles.append(module.register_forward_hook(_gather_last_dim))
            elif style == "embedding_rowwise":
                rows = module.num_embeddings // group.world
                outside: list[torch.Tensor] = []
                self._handles.append(module.register_forward_pre_hook(
                    lambda m, args, rows=rows, outside=outside: _local_ids(args, group.rank * rows, rows, outside)))
                self._handles.append(module.register_forward_hook(
                    lambda m, args, output, outside=outside: _sum_embeddings(output, outside)))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _all_reduce(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(output)
    return output


def _gather_last_dim(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(output) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, output.contiguous())
    return torch.cat(parts, dim=-1)


def _local_ids(args: tuple[Any, ...], start: int, rows: int, outside: list[torch.Tensor]) -> tuple[Any, ...]:
    """The ids as rows of this rank's slice; ids outside it look up row 0 and are zeroed after."""
    ids = args[0] - start
    mask = (ids < 0) | (ids >= rows)
    outside[:] = [mask]
    return (ids.masked_fill(mask, 0), *args[1:])


def _sum_embeddings(output: torch.Tensor, outside: list[torch.Tensor]) -> torch.Tensor:
    import torch.distributed as dist

    output = output.masked_fill(outside.pop()[..., None], 0)
    dist.all_reduce(output)
    return output
