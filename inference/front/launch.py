"""`tierstore generate --tp N`: start N ranks of the same command on this host, as torchrun would, and end them
together: the first rank to fail stops the others, and its error is the one line printed."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from ...errors import InputError

# words of a rank's error that echoes another rank's failure (its peer went away) rather than causing it
COLLECTIVE_WORDS = ("gloo", "nccl", "connection", "peer", "timed out", "timeout", "socket")


def check_launch(model: str, world: int, cfg: Any, trust_remote_code: bool, allow_download: bool) -> None:
    """Everything the ranks would refuse, refused before any starts: N against the GPUs here and the model's
    heads. The checkpoint is converted here, once, if it must be."""
    from ..devices import compute_device
    from ..loading.checkpoint import load_config
    from ..loading.convert import convert_if_needed
    from ..loading.resolve import resolve
    from ..loading.shards import whole_model_config
    from ..loading.splits import check_world

    if world < 1:
        raise InputError(f"--tp must be at least 1, got {world}")
    device = compute_device(cfg.runtime.device)
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise InputError(f"--tp {world} asks for {world} ranks, one per GPU, but this host has "
                         f"{torch.cuda.device_count()} GPUs")
    # converted as the ranks read it (a config.json alone: each rank's shards were written beforehand)
    checkpoint = convert_if_needed(resolve(model, allow_download=allow_download, weights=False),
                                   whole_model_config(cfg), trust_remote_code, True)
    check_world(load_config(checkpoint, trust_remote_code), world)


def run_ranks(argv: list[str], world: int) -> int:
    """Run `tierstore ARGV` as ranks 0..world-1 (rank 0's output is the command's); returns the exit code."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tierstore-ranks-") as logs:
        errors = [open(os.path.join(logs, f"rank{rank}.err"), "w+", encoding="utf-8") for rank in range(world)]
        procs = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen([sys.executable, "-m", "tierstore", *argv], env=env, stderr=errors[rank],
                                          stdout=None if rank == 0 else subprocess.DEVNULL))
        try:
            return _wait(procs, errors)
        except KeyboardInterrupt:
            _stop(procs, signal.SIGINT)
            print("tierstore: interrupted", file=sys.stderr)
            return 130
        finally:
            _stop(procs, signal.SIGTERM)
            for error in errors:
                error.close()


def free_port() -> int:
    """A localhost port free now (the ranks' rendezvous; the tests' servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(procs: list[subprocess.Popen], errors: list[Any]) -> int:
    while True:
        codes = [proc.poll() for proc in procs]
        if all(code == 0 for code in codes):
            errors[0].seek(0)
            sys.stderr.write(errors[0].read())  # rank 0's warnings and notes, as a single process would print
            return 0
        if any(code not in (None, 0) for code in codes):
            deadline = time.monotonic() + 1.0  # the others fail within moments when a peer has gone
            while time.monotonic() < deadline and any(proc.poll() is None for proc in procs):
                time.sleep(0.05)
            rank, code, line = _first_cause(procs, errors)
            print(f"tierstore: error: rank {rank} of {len(procs)}: {line}", file=sys.stderr)
            return 2 if code == 2 else 1
        time.sleep(0.05)


def _first_cause(procs: list[subprocess.Popen], errors: list[Any]) -> tuple[int, int, str]:
    """The failed rank whose error is the cause, not an echo: bad input first, then an error that is not about
    the collectives, then the lowest rank."""
    failed = []
    for rank, (proc, error) in enumerate(zip(procs, errors)):
        if proc.returncode in (None, 0):
            continue
        error.seek(0)
        lines = [line.strip() for line in error.read().splitlines() if line.strip()]
        line = next((line for line in reversed(lines) if line.startswith("tierstore:")), lines[-1] if lines else
                    f"exited with {proc.returncode}")
        line = line.removeprefix("tierstore: error: ").removeprefix("tierstore: ")
        echo = any(word in line.lower() for word in COLLECTIVE_WORDS)
        failed.append((proc.returncode != 2, echo, rank, proc.returncode, line))
    _, _, rank, code, line = min(failed)
    return rank, code, line


def _stop(procs: list[subprocess.Popen], sig: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
