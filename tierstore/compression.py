"""Compressed storage of a unit's matrices, dequantized where it computes.

Two kinds of codec:
- block-wise 8-bit and 4-bit (nf4) with bitsandbytes, which tierstore quantizes itself (`compression.format`): a
  unit keeps its small tensors (norms, biases) as they are and packs all its matrices into two tensors: PACKED, the
  codes of every matrix back to back, and ABSMAX, one float32 scale per block. Each matrix starts on a block
  boundary, so no block mixes two matrices, and one kernel call per unit dequantizes them all;
- "ggml": matrices in GGML's block formats (Q4_K, Q8_0, ..., one format per matrix, see ggml.py), back to back
  in PACKED, their scales inside their blocks: a GGUF file's own, or quantized by tierstore with a recipe
  (`compression.format = "q4_k"`, ...; ggml_quantize.py), optionally fitted to a calibration text (and rounded
  by GPTQ, gptq.py, optionally on rotated inputs: rotation.py, the matrix turned back after it is dequantized), or
  a format per matrix chosen to meet `compression.bits` (`"mixed"`, allocation.py).
Either way the matrices are dequantized into a scratch buffer that the model's matrices then view. Units stay
compressed in every tier, the device included: a resident unit costs its compressed bytes, and each use costs one
dequantization (0.21 ms of GPU time for a 7B layer in nf4 on an H200, benchmarks/dequant_cost.py).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Hashable, Mapping, Set
from typing import Any

import torch

from .allocation import CANDIDATES, HIGHEST_BITS, LOWEST_BITS
from .calibration import calibration_text, text_digest
from .config import BLOCKSIZES, COMPRESSION_FORMATS
from .errors import CheckpointError, ConfigError
from .ggml import BLOCKS as GGML_BLOCKS
from .ggml import bits_per_weight as ggml_bits
from .ggml import dequantize as ggml_dequantize
from .ggml import matvec as ggml_matvec
from .ggml import multiplies_packed as ggml_multiplies_packed
from .ggml import packed_bytes as ggml_packed_bytes
from .rotation import HADAMARD
from .rotation import applies as rotates
from .rotation import rotate, unrotate_
from .units import UnitLayout, align

PACKED = "tierstore.packed"
ABSMAX = "tierstore.absmax"
DEFAULT_BLOCKSIZE = {"nf4": 64, "int8": 256}
GGML = "ggml"  # matrices in GGML's block formats (ggml.py), each in its own: a GGUF's, or quantized by a recipe
# recipe -> the block format of its matrices; "q4_k_m" gives some attention value and MLP down matrices Q6_K
GGML_RECIPES = {"q2_k": "Q2_K", "q3_k": "Q3_K", "q4_k": "Q4_K", "q4_k_m": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K",
                "q8_0": "Q8_0"}
MIXED = "mixed"  # a format per matrix, meeting compression.bits (allocation.py)
NEAREST, GPTQ = "nearest", "gptq"  # compression.rounding: how a calibrated recipe chooses its codes
ROUNDINGS = (NEAREST, GPTQ)


def ggml_recipe(format: str) -> bool:
    """Whether compression.format `format` is one tierstore quantizes into GGML blocks (a recipe, or mixed): the
    formats a calibration text and GPTQ rounding apply to."""
    return format in GGML_RECIPES or format == MIXED
GGML_ALIGN_ELEMENTS, GGML_ALIGN_BYTES = 256, 16  # where a ggml matrix may start in the dequantized buffer and PACKED


def _ops() -> Any:
    """bitsandbytes' registered torch ops, imported on first use (its CPU backend warns about an optional
    kernel package tierstore never calls)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except ImportError as exc:
        raise ConfigError("compressed weights need bitsandbytes: pip install 'tierstore[bnb]'") from exc
    return torch.ops.bitsandbytes


@dataclasses.dataclass(frozen=True)
class Codec:
    """How a store's matrices are compressed: format, elements per block, (int8) the code book, and for GGML
    blocks the recipe tierstore quantized them with ("" for a GGUF's own)."""

    format: str
    blocksize: int
    code: tuple[float, ...] = ()
    recipe: str = ""
    calibration: str = ""  # a recipe's calibration text (its digest); "" = data-free
    bits: float = 0.0  # "mixed": the bits per weight its formats meet
    allocation: tuple[tuple[str, str], ...] = ()  # "mixed": (matrix, format) each, once measured (allocation.py)
    rounding: str = ""  # a calibrated recipe's codes: "" = each to its nearest level, GPTQ = by GPTQ (gptq.py)
    rotation: str = ""  # a recipe's matrices: "" = as they are, HADAMARD = inputs rotated first (rotation.py)

    @classmethod
    def create(cls, format: str, blocksize: int | None = None, calibration: str = "", bits: float = 0.0,
               rounding: str = NEAREST, rotation: str = "none") -> "Codec":
        """A codec with bitsandbytes' defaults, or a GGML recipe (fitted to the calibration text whose digest is
        `calibration`, its codes chosen by `rounding`, its matrices' inputs rotated first under `rotation`;
        "mixed": formats per matrix within `bits` per weight, allocated when the store is written); ConfigError
        naming what is not allowed."""
        if format not in COMPRESSION_FORMATS:
            raise ConfigError(f"compression.format: {format!r} is not allowed; choose from none, "
                              f"{', '.join(COMPRESSION_FORMATS)}")
        if rounding not in ROUNDINGS:
            raise ConfigError(f"compression.rounding: {rounding!r} is not allowed; choose from "
                              f"{', '.join(ROUNDINGS)}")
        if rotation not in ("none", HADAMARD):
            raise ConfigError(f"compression.rotation: {rotation!r} is not allowed; choose from none, {HADAMARD}")
        if rotation == HADAMARD and not ggml_recipe(format):
            raise ConfigError(f"compression.rotation = {HADAMARD} applies to the GGML formats tierstore quantizes "
                              f"({', '.join(GGML_RECIPES)}, {MIXED}), not {format}")
        if rotation == HADAMARD and rounding != GPTQ:
            raise ConfigError(f"compression.rotation = {HADAMARD} needs compression.rounding = gptq (and a "
                              f"calibration text): without GPTQ's error feedback a rotation loses quality (SmolLM2 "
                              f"off its grid, q3_k: 53.2% top-1, rotated 44.2%)")
        if rounding == GPTQ and not (calibration and ggml_recipe(format)):
            raise ConfigError("compression.rounding = gptq fits codes to a calibration text's activations: it needs "
                              "a GGML format (q4_k, ..., mixed) and compression.calibration")
        if ggml_recipe(format):
            if blocksize is not None:
                raise ConfigError(f"compression.blocksize applies to nf4 and int8; {format} has fixed blocks")
            if format == MIXED and not LOWEST_BITS <= bits <= HIGHEST_BITS:
                raise ConfigError(f"compression.bits = {bits}: mixed formats take {LOWEST_BITS:.4g} to "
                                  f"{HIGHEST_BITS:.4g} bits per weight")
            return cls(GGML, 0, recipe=format, calibration=calibration, bits=bits if format == MIXED else 0.0,
                       rounding=GPTQ if rounding == GPTQ else "", rotation=HADAMARD if rotation == HADAMARD else "")
        if calibration:
            raise ConfigError(f"compression.calibration applies to the GGML formats ({', '.join(GGML_RECIPES)}), "
                              f"not {format}")
        blocksize = DEFAULT_BLOCKSIZE[format] if blocksize is None else blocksize
        if blocksize not in BLOCKSIZES:
            raise ConfigError(f"compression.blocksize: {blocksize} is not allowed; choose from "
                              f"{', '.join(map(str, BLOCKSIZES))}")
        code: tuple[float, ...] = ()
        if format == "int8":
            _ops()
            from bitsandbytes.functional import create_dynamic_map
            code = tuple(create_dynamic_map(signed=True).tolist())
        return cls(format, blocksize, code)

    @classmethod
    def wanted(cls, compression: Any) -> "Codec | None":
        """The codec a config's [compression] section asks for, or None for format "none"."""
        if compression.format == "none":
            return None
        digest = text_digest(calibration_text(compression.calibration)) if compression.calibration else ""
        return cls.create(compression.format, compression.blocksize, digest, compression.bits, compression.rounding,
                          compression.rotation)

    @classmethod
    def ggml(cls) -> "Codec":
        """The codec of a GGUF's matrices kept as the file packs them (formats recorded per matrix)."""
        return cls(GGML, 0)

    @property
    def name(self) -> str:
        if self.format == GGML:
            recipe = f"{MIXED}{self.bits:g}" if self.recipe == MIXED else self.recipe or GGML
            fitted = f"-{self.rounding or 'imatrix'}-{self.calibration}" if self.calibration else ""
            return recipe + fitted + ("-rot" if self.rotation else "")
        return f"{self.format}-{self.blocksize}"

    @property
    def align_elements(self) -> int:
        """Where a matrix may start: a block boundary that is also 256 bytes into the packed codes."""
        return math.lcm(self.blocksize, 512 if self.format == "nf4" else 256)

    def packed_bytes(self, numel: int) -> int:
        return numel // 2 if self.format == "nf4" else numel

    def to_dict(self) -> dict[str, Any]:
        data = {"format": self.format, "blocksize": self.blocksize, "code": list(self.code)}
        if self.recipe:
            data["recipe"] = self.recipe
        if self.calibration:
            data["calibration"] = self.calibration
        if self.recipe == MIXED:
            data["bits"] = self.bits
            data["allocation"] = dict(self.allocation)
        if self.rounding:
            data["rounding"] = self.rounding
        if self.rotation:
            data["rotation"] = self.rotation
        return data

    def identity(self) -> dict[str, Any]:
        """What tells one store of this codec from another (`codec_identity` of `to_dict`)."""
        return codec_identity(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Codec":
        try:
            codec = cls(str(data["format"]), int(data["blocksize"]), tuple(float(x) for x in data.get("code", ())),
                        str(data.get("recipe", "")), str(data.get("calibration", "")), float(data.get("bits", 0.0)),
                        tuple(sorted((str(name), str(format))
                                     for name, format in data.get("allocation", {}).items())),
                          str(data.get("rounding", "")), str(data.get("rotation", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: malformed compression record") from exc
        if codec.format == GGML and codec.blocksize == 0 and not codec.code \
                and (codec.recipe == "" or ggml_recipe(codec.recipe)) \
                and all(format in CANDIDATES for _, format in codec.allocation) and codec.rounding in ("", GPTQ) \
                and codec.rotation in ("", HADAMARD):
            return codec
        if codec.format not in COMPRESSION_FORMATS or codec.blocksize not in BLOCKSIZES \
                or (codec.format == "int8") != (len(codec.code) == 256):
            raise CheckpointError(f"{where}: unsupported compression {data!r}")
        return codec


@dataclasses.dataclass(frozen=True)
class PackedMatrices:
    """Where each matrix of one unit sits in its dequantized flat vector of `numel` elements, and for a ggml unit
    each matrix's block format and first byte in PACKED."""

    numel: int
    matrices: Mapping[str, tuple[int, tuple[int, ...]]]  # name -> (first element, shape)
    formats: Mapping[str, tuple[str, int]] = dataclasses.field(default_factory=dict)  # ggml: name -> (format, byte)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "numel": self.numel,
            "matrices": {name: [offset, list(shape)] for name, (offset, shape) in self.matrices.items()}}
        if self.formats:
            data["ggml"] = {name: [format, start] for name, (format, start) in self.formats.items()}
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "PackedMatrices":
        try:
            numel = int(data["numel"])
            matrices = {str(name): (int(offset), tuple(int(d) for d in shape))
                        for name, (offset, shape) in data["matrices"].items()}
            formats = {str(name): (str(format), int(start)) for name, (format, start) in data.get("ggml", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: malformed packed-matrix record") from exc
        if any(offset < 0 or offset + math.prod(shape) > numel for offset, shape in matrices.values()):
            raise CheckpointError(f"{where}: a packed matrix lies outside its {numel} elements")
        if formats and (set(formats) != set(matrices) or any(f not in GGML_BLOCKS for f, _ in formats.values())):
            found = sorted({format for format, _ in formats.values()})
            raise CheckpointError(f"{where}: unsupported ggml matrix formats {found}")
        return cls(numel, matrices, formats)

    def ggml_bytes(self, name: str) -> tuple[int, int]:
        """First and last byte (exclusive) of ggml matrix `name` in PACKED."""
        format, start = self.formats[name]
        return start, start + ggml_packed_bytes(format, math.prod(self.matrices[name][1]))


def codec_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """A codec's record less its allocation, which a store written again would measure again: what tells one
    compressed store from another."""
    return {key: value for key, value in record.items() if key != "allocation"}


def ggml_layout(key: str, plain: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                matrices: Mapping[str, tuple[str, tuple[int, ...]]]) -> tuple[UnitLayout, PackedMatrices]:
    """The layout of a unit whose `plain` tensors are stored as they are and whose `matrices` (name -> ggml format,
    shape) keep their blocks in PACKED. The alignments are small enough that matrices of whole 256-element rows follow
    each other without a gap, so that a run of one format is dequantized by one call (`ggml_runs`)."""
    placed: dict[str, tuple[int, tuple[int, ...]]] = {}
    formats: dict[str, tuple[str, int]] = {}
    numel = nbytes = 0
    for name, (format, shape) in matrices.items():
        placed[name], formats[name] = (numel, tuple(shape)), (format, nbytes)
        numel += align(math.prod(shape), GGML_ALIGN_ELEMENTS)
        nbytes += align(ggml_packed_bytes(format, math.prod(shape)), GGML_ALIGN_BYTES)
    tensors = {**plain, PACKED: (torch.uint8, (nbytes,))}
    return UnitLayout.pack(key, tensors), PackedMatrices(numel, placed, formats)


def ggml_runs(packed: PackedMatrices) -> list[tuple[str, int, int, int, int]]:
    """A ggml unit's matrices as runs of one format that lie back to back both in PACKED and in the dequantized
    buffer: (format, first byte, end byte, first element, end element) each."""
    runs: list[tuple[str, int, int, int, int]] = []
    for name, (offset, shape) in sorted(packed.matrices.items(), key=lambda item: item[1][0]):
        start, end = packed.ggml_bytes(name)
        format, numel = packed.formats[name][0], math.prod(shape)
        if runs and runs[-1][0] == format and runs[-1][2] == start and runs[-1][4] == offset:
            runs[-1] = (format, runs[-1][1], end, runs[-1][3], offset + numel)
        else:
            runs.append((format, start, end, offset, offset + numel))
    return runs


def bits_per_weight(codec: Codec, packed: Mapping[Hashable, PackedMatrices]) -> float:
    """Stored bits per element of the compressed matrices (block scales included, alignment not)."""
    if codec.format != GGML:  # the code, and its block's float32 scale
        return (4 if codec.format == "nf4" else 8) + 32 / codec.blocksize
    pairs = [(ggml_bits(p.formats[name][0]), math.prod(shape))
             for p in packed.values() for name, (_, shape) in p.matrices.items()]
    return sum(bits * numel for bits, numel in pairs) / max(sum(numel for _, numel in pairs), 1)


def describe_formats(packed: Mapping[Hashable, PackedMatrices]) -> str:
    """The ggml formats of a store's matrices and how many of each, e.g. "Q4_K x150, Q6_K x30"."""
    counts: dict[str, int] = {}
    for p in packed.values():
        for format, _ in p.formats.values():
            counts[format] = counts.get(format, 0) + 1
    return ", ".join(f"{format} x{count}" for format, count in sorted(counts.items(), key=lambda kv: -kv[1]))


def compressed_layout(layout: UnitLayout, matrices: Set[str], codec: Codec) -> tuple[UnitLayout, PackedMatrices | None]:
    """The layout a unit gets when `matrices` (names in `layout`, of all the model's matrices) are compressed,
    computed without any data."""
    chosen = [name for name in layout.slots if name in matrices]
    if not chosen:
        return layout, None
    if codec.format == GGML:
        formats = recipe_formats(codec, {name: layout.slots[name].shape for name in chosen}, matrices)
        plain = {name: (slot.dtype, slot.shape) for name, slot in layout.slots.items() if name not in formats}
        return ggml_layout(layout.key, plain, {name: (formats[name], layout.slots[name].shape) for name in chosen})
    placed: dict[str, tuple[int, tuple[int, ...]]] = {}
    numel = 0
    for name in chosen:
        placed[name] = (numel, layout.slots[name].shape)
        numel += align(math.prod(layout.slots[name].shape), codec.align_elements)
    tensors = {name: (slot.dtype, slot.shape) for name, slot in layout.slots.items() if name not in placed}
    tensors[PACKED] = (torch.uint8, (codec.packed_bytes(numel),))
    tensors[ABSMAX] = (torch.float32, (numel // codec.blocksize,))
    return UnitLayout.pack(layout.key, tensors), PackedMatrices(numel, placed)


def compress_unit(layout: UnitLayout, buffer: torch.Tensor, matrices: Set[str], codec: Codec,
                  device: torch.device, importance: Mapping[str, torch.Tensor] | None = None,
                  ) -> tuple[UnitLayout, torch.Tensor, PackedMatrices | None]:
    """Compress the matrices of one unit (its bytes in `buffer`, on the CPU or already on `device`) on `device`;
    returns the new layout, its CPU buffer (`buffer` itself when the unit has no matrices) and where the matrices
    sit. `importance`: a calibrated GGML recipe's importance matrix (matrix name -> mean square of each input
    feature)."""
    packed_layout, packed = compressed_layout(layout, matrices, codec)
    if packed is None:
        return layout, buffer, None
    source = layout.views(buffer)
    if codec.format == GGML:
        buffer = _ggml_unit(packed_layout, packed, source, device, importance or {}, bool(codec.rotation))
        return packed_layout, buffer, packed
    dtype = next(source[name].dtype for name in packed.matrices)
    flat = torch.zeros(packed.numel, dtype=dtype, device=device)
    for name, (offset, shape) in packed.matrices.items():
        flat[offset:offset + math.prod(shape)].copy_(source[name].reshape(-1))
    ops = _ops()
    if codec.format == "nf4":
        codes, absmax = ops.quantize_4bit(flat, codec.blocksize, "nf4", torch.uint8)
    else:
        codes, absmax = ops.quantize_blockwise(flat, torch.tensor(codec.code, device=device), codec.blocksize)
    out = torch.zeros(packed_layout.nbytes, dtype=torch.uint8)
    targets = packed_layout.views(out)
    for name, tensor in source.items():
        if name not in packed.matrices:
            targets[name].copy_(tensor)
    targets[PACKED].copy_(codes.reshape(-1))
    targets[ABSMAX].copy_(absmax.reshape(-1))
    return packed_layout, out, packed


def recipe_formats(codec: Codec | str, shapes: Mapping[str, tuple[int, ...]], matrices: Set[str]) -> dict[str, str]:
    """The block format of each matrix (name -> shape) under a GGML codec (or recipe name). "q4_k_m" follows
    llama.cpp's Q4_K_M: Q6_K for the attention value and MLP down matrices of the first and last eighth of the
    layers and of every third layer between, Q4_K elsewhere. "mixed" gives each matrix its allocated format
    (before the allocation is measured, for a plan: the candidate nearest its bits). A matrix whose size is not a
    whole number of the format's blocks falls back to Q8_0 (32-element blocks); one that is not even that is
    refused."""
    codec = Codec(GGML, 0, recipe=codec) if isinstance(codec, str) else codec
    recipe = codec.recipe
    layers = len({index for index in map(_layer_index, matrices) if index is not None})
    allocation = dict(codec.allocation)
    nearest = min(CANDIDATES, key=lambda format: abs(ggml_bits(format) - codec.bits))
    formats = {}
    for name, shape in shapes.items():
        format = allocation.get(name, nearest) if recipe == MIXED else GGML_RECIPES[recipe]
        index = _layer_index(name)
        if recipe == "q4_k_m" and index is not None and name.rsplit(".", 2)[-2] in ("v_proj", "down_proj") \
                and (index < layers // 8 or index >= 7 * layers // 8 or (index - layers // 8) % 3 == 2):
            format = "Q6_K"
        numel = math.prod(shape)
        if numel % GGML_BLOCKS[format][0]:
            format = "Q8_0"
        if numel % GGML_BLOCKS[format][0]:
            raise ConfigError(f"compression.format {recipe}: matrix {name} has {numel} elements, not a multiple of "
                              f"32; use nf4 or int8")
        formats[name] = format
    return formats


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for before, after in zip(parts, parts[1:]):
        if before == "layers" and after.isdigit():
            return int(after)
    return None


def _ggml_unit(layout: UnitLayout, packed: PackedMatrices, source: Mapping[str, torch.Tensor],
               device: torch.device, importance: Mapping[str, torch.Tensor], rotated: bool = False) -> torch.Tensor:
    """A unit's buffer with its matrices quantized on `device` into their GGML blocks (recipe_formats), each
    weight's error weighed by its input feature's importance where the matrix has one, or the blocks GPTQ made for
    it where `importance` holds them. `rotated`: each matrix whose columns come in whole blocks is quantized as
    W R (rotation.py; the importance, measured on unrotated inputs, is then not used)."""
    from .ggml_quantize import quantize
    from .gptq import blocks_key

    out = torch.zeros(layout.nbytes, dtype=torch.uint8)
    targets = layout.views(out)
    for name, tensor in source.items():
        if name not in packed.formats:
            targets[name].copy_(tensor)
            continue
        format = packed.formats[name][0]
        start, end = packed.ggml_bytes(name)
        rounded = importance.get(blocks_key(name, format))
        if rounded is not None:  # GPTQ's, made while the calibration text ran
            targets[PACKED][start:end].copy_(rounded)
            continue
        weight = importance.get(name)
        if rotated and rotates(tuple(tensor.shape)):
            tensor, weight = rotate(tensor.to(device), name), None
        if weight is not None and weight.numel() != tensor.shape[-1]:  # only column j's importance, on every row
            weight = None
        targets[PACKED][start:end].copy_(quantize(format, tensor.to(device).reshape(-1), weight))
    return out


class Decompressor:
    """Dequantizes compressed matrices into one scratch buffer on the compute device, in the compute stream's
    order: the next dequantization is queued after the compute that read the previous one, so one buffer serves
    every unit without waiting on the host. A unit's matrices are dequantized together (`materialize`), or, for
    the units in `per_matrix`, one at a time as each is used (`materialize_matrix`): the buffer then holds the
    largest matrix, not the largest unit."""

    MATVEC_DEVICES = ("cuda",)  # where `matvec` runs its Triton kernels (a CPU test adds "cpu": the interpreter)

    def __init__(self, codec: Codec, packed: Mapping[Hashable, PackedMatrices], dtype: torch.dtype,
                 device: torch.device, per_matrix: Set[Hashable] = frozenset()) -> None:
        self.codec = codec
        self.per_matrix = frozenset(per_matrix)
        self.packed = dict(packed)
        self._unpacker = MatrixUnpacker(codec, dtype, device)
        self.scratch = torch.empty(scratch_bytes(packed, dtype, self.per_matrix) // dtype.itemsize, dtype=dtype,
                                   device=device)
        self._views = {key: {name: self.scratch[offset:offset + math.prod(shape)].view(shape)
                             for name, (offset, shape) in p.matrices.items()}
                       for key, p in self.packed.items() if key not in self.per_matrix}
        self._runs = {key: ggml_runs(p) for key, p in self.packed.items()} if codec.format == GGML else {}
        self._rotated = {key: [name for name, (_, shape) in p.matrices.items() if rotates(shape)]
                         for key, p in self.packed.items()} if codec.rotation else {}
        self._fusable = {key for key, p in self.packed.items() if multiplies_packed(codec, p, device)}

    def __contains__(self, key: Hashable) -> bool:
        return key in self.packed

    def matrix_names(self, key: Hashable) -> frozenset[str]:
        """The compressed matrices of unit `key`."""
        return frozenset(self.packed[key].matrices)

    def materialize(self, key: Hashable, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unit's tensors with its matrices dequantized. The matrices are valid for the compute queued before
        the next call: two compressed units must never be in use at once (the hooks check this at setup)."""
        packed = self.packed[key]
        if self.codec.format == GGML:
            for format, start, end, first, last in self._runs[key]:
                ggml_dequantize(format, tensors[PACKED][start:end], self.scratch[first:last])
            for name in self._rotated.get(key, ()):
                unrotate_(self._views[key][name], name)
        else:
            self._unpacker.dequantize(tensors[PACKED], tensors[ABSMAX], self.scratch[:packed.numel])
        return {**tensors, **self._views[key]}

    def multiplies_packed(self, key: Hashable) -> bool:
        """Whether every compressed matrix of unit `key` can be multiplied in its blocks (`matvec`): see
        `multiplies_packed`; on a GPU."""
        return key in self._fusable

    def matvec(self, key: Hashable, name: str, tensors: Mapping[str, torch.Tensor],
               x: torch.Tensor) -> torch.Tensor | None:
        """x (..., columns) times matrix `name` of unit `key` transposed, read in its blocks without dequantizing
        it (a decode step's few tokens: each weight's packed bits are read once); None where the kernel is not
        there after all (the caller dequantizes)."""
        packed = self.packed[key]
        format, _ = packed.formats[name]
        start, end = packed.ggml_bytes(name)
        rows, columns = packed.matrices[name][1]
        inputs = x.reshape(-1, columns).contiguous()
        out = torch.empty(inputs.shape[0], rows, dtype=x.dtype, device=x.device)
        if not ggml_matvec(format, tensors[PACKED][start:end], inputs, out):
            self._fusable.discard(key)
            return None
        return out.view(*x.shape[:-1], rows)

    def materialize_matrix(self, key: Hashable, name: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Matrix `name` of unit `key` (whose stored tensors are `tensors`) dequantized, valid for the compute
        queued before the next call."""
        return self._unpacker.matrix_into(self.packed[key], name, tensors, self.scratch)


class MatrixUnpacker:
    """Dequantizes one matrix of a compressed unit into a buffer on `device` (the unit's tensors there too)."""

    def __init__(self, codec: Codec, dtype: torch.dtype, device: torch.device) -> None:
        self.codec = codec
        self._dtype = dtype
        self._ops = _ops() if codec.format != GGML else None
        self._code = torch.tensor(codec.code, device=device) if codec.code else None
        self._out_variant = device.type == "cuda"  # bitsandbytes' CPU backend has no `out=` kernels

    def matrix_into(self, packed: PackedMatrices, name: str, tensors: Mapping[str, torch.Tensor],
                    out: torch.Tensor) -> torch.Tensor:
        """Matrix `name` of a unit (`packed`: where its matrices sit; `tensors`: its stored tensors) dequantized
        into the start of `out` (1-D, in the compute dtype, room for `unpacked_numel(codec, shape)` elements);
        returns that part of `out` in the matrix's shape."""
        offset, shape = packed.matrices[name]
        numel = math.prod(shape)
        if self.codec.format == GGML:
            start, end = packed.ggml_bytes(name)
            ggml_dequantize(packed.formats[name][0], tensors[PACKED][start:end], out[:numel])
            matrix = out[:numel].view(shape)
            if self.codec.rotation and rotates(shape):
                unrotate_(matrix, name)
            return matrix
        whole = unpacked_numel(self.codec, shape)
        codes, scales = block_ranges(self.codec, offset, whole)
        self.dequantize(tensors[PACKED][codes], tensors[ABSMAX][scales], out[:whole])
        return out[:numel].view(shape)

    def dequantize(self, codes: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor) -> None:
        """bitsandbytes' codes and block scales into `out` (its length: the codes' elements)."""
        numel = out.numel()
        if self.codec.format == "nf4":
            if self._out_variant:
                self._ops.dequantize_4bit.out(codes, absmax, self.codec.blocksize, "nf4", [numel], self._dtype,
                                              out=out)
            else:
                out.copy_(self._ops.dequantize_4bit(codes, absmax, self.codec.blocksize, "nf4", [numel],
                                                    self._dtype).reshape(-1))
        elif self._out_variant:
            self._ops.dequantize_blockwise.out(codes, absmax, self._code, self.codec.blocksize, self._dtype, out=out)
        else:
            out.copy_(self._ops.dequantize_blockwise(codes, absmax, self._code, self.codec.blocksize,
                                                     self._dtype).reshape(-1))


def multiplies_packed(codec: Codec, packed: PackedMatrices, device: torch.device) -> bool:
    """Whether a unit's matrices are multiplied in their blocks on `device` (Decompressor.matvec): a device the
    Triton kernels run on (Decompressor.MATVEC_DEVICES), GGML formats with a matrix-vector kernel (the k-quants
    and the legacy ones), rows of whole blocks, none rotated."""
    return device.type in Decompressor.MATVEC_DEVICES and codec.format == GGML and not codec.rotation and all(
        len(shape) == 2 and ggml_multiplies_packed(packed.formats[name][0], shape[1])
        for name, (_, shape) in packed.matrices.items())


def unpacked_numel(codec: Codec, shape: tuple[int, ...]) -> int:
    """Elements a matrix of `shape` takes while it is dequantized (bitsandbytes' codecs: whole blocks)."""
    numel = math.prod(shape)
    return numel if codec.format == GGML else align(numel, codec.blocksize)


def block_ranges(codec: Codec, offset: int, numel: int) -> tuple[slice, slice]:
    """Where a matrix of bitsandbytes' codec (at element `offset` of its unit's packed matrices, `numel` elements:
    whole blocks, as matrices start on block boundaries) sits: its codes' bytes in PACKED, its block scales (one
    float32 each) in ABSMAX."""
    return (slice(codec.packed_bytes(offset), codec.packed_bytes(offset + numel)),
            slice(offset // codec.blocksize, (offset + numel) // codec.blocksize))


def scratch_bytes(packed: Mapping[Hashable, PackedMatrices], dtype: torch.dtype,
                  per_matrix: Set[Hashable] = frozenset()) -> int:
    """Device bytes of the dequantization buffer in the compute dtype: the largest unit's matrices, or for the
    units in `per_matrix` their largest matrix."""
    def numel(key: Hashable, p: PackedMatrices) -> int:  # a matrix is dequantized in whole blocks
        if key not in per_matrix:
            return p.numel
        return max(align(math.prod(shape), max(BLOCKSIZES)) for _, shape in p.matrices.values())

    return max((numel(key, p) for key, p in packed.items()), default=0) * dtype.itemsize
