"""GPTQ rounding onto GGML's grids (tierstore/gptq.py) and the stores it writes (compression.rounding = "gptq")."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import tierstore
from tierstore import ggml, ggml_quantize
from tierstore.allocation import CANDIDATES
from tierstore.compression import Codec
from tierstore.errors import ConfigError
from tierstore.gptq import blocks_key, output_error, quantize_gptq

IDS = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])


def _correlated_inputs(columns: int, tokens: int = 4096, draw: int = 0) -> torch.Tensor:
    """Inputs whose features are mixed (so they correlate) and of unequal scale, as a layer's activations are:
    the same distribution for every `draw`, other tokens."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(columns, columns, generator=generator) / columns ** 0.5 + torch.eye(columns)
    scale = torch.exp(torch.randn(columns, generator=generator))
    return (torch.randn(tokens, columns, generator=torch.Generator().manual_seed(100 + draw)) @ mixing) * scale


@pytest.mark.parametrize("format", CANDIDATES)
def test_uncorrelated_inputs_leave_nothing_to_fold_so_codes_are_the_nearest(format):
    """With H a multiple of the identity no column's error reaches another: GPTQ's blocks are the nearest
    rounding's on the same grid, byte for byte (whatever order the equal columns are taken in)."""
    weight = torch.randn(8, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    got = quantize_gptq(format, weight, 3.0 * torch.eye(512))
    assert torch.equal(got, ggml_quantize.quantize(format, weight.reshape(-1), torch.ones(weight.numel())))


@pytest.mark.parametrize("format", CANDIDATES)
def test_gptq_lowers_the_output_error_where_inputs_correlate(format):
    """The point of it: for correlated inputs of unequal scale, the output error tr(D H D^T) of GPTQ's blocks is
    well under that of nearest rounding weighed by the same importance (H's diagonal), in the same format and
    bytes; on inputs it was not fitted to as well (a fresh draw of the same distribution)."""
    columns = 256
    weight = torch.randn(64, columns, generator=torch.Generator().manual_seed(2)) * 0.02
    fitted, fresh = _correlated_inputs(columns), _correlated_inputs(columns, draw=1)
    hessian = fitted.T @ fitted
    nearest = ggml_quantize.quantize(format, weight.reshape(-1), hessian.diagonal().repeat(64))
    rounded = quantize_gptq(format, weight, hessian)
    assert rounded.numel() == nearest.numel() == weight.numel() * ggml.BLOCKS[format][1] // ggml.BLOCKS[format][0]
    gain = 0.8 if format == "Q2_K" else 0.7  # 2-bit codes clamp more of the error GPTQ folds on (measured: 0.73)
    for inputs in (hessian, fresh.T @ fresh):
        assert output_error(format, rounded, weight, inputs) < gain * output_error(format, nearest, weight, inputs)


def test_an_input_never_seen_and_a_wrong_hessian():
    """A feature that is zero over the whole calibration (its H row and column zero) is rounded plainly, not to
    NaN; a Hessian of the wrong size is refused naming both sizes."""
    weight = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    inputs = _correlated_inputs(256)
    inputs[:, 7] = 0
    blocks = quantize_gptq("Q4_K", weight, inputs.T @ inputs)
    restored = torch.empty(weight.numel())
    ggml.dequantize("Q4_K", blocks, restored)
    assert torch.isfinite(restored).all() and (restored.view_as(weight) - weight).abs().max() < 0.5
    with pytest.raises(ValueError, match=r"hessian is \(128, 128\); a matrix of 256 columns needs \(256, 256\)"):
        quantize_gptq("Q4_K", weight, torch.eye(128))


@pytest.fixture
def token_calibration(monkeypatch):
    """Calibration without a tokenizer: the tiny models read fixed random token ids as their calibration text."""
    from tierstore.inference.decoding import importance

    ids = torch.randint(3, 256, (700,), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(importance, "_token_ids", lambda model, text: ids)


@pytest.mark.parametrize("recipe", ["q4_k", "mixed", "q3_k+rotation", "mixed+rotation"])
def test_a_gptq_store_holds_the_blocks_gptq_made_and_runs_as_them(recipe, tiny_dirs, tmp_path, monkeypatch,
                                                                   token_calibration):
    """A tiny Llama written with compression.rounding = "gptq": the store holds the blocks the calibration's GPTQ
    made (its tokens and logits are transformers' with those blocks dequantized), they differ from nearest
    rounding's, mixed formats are allocated from GPTQ's measured errors, and the store is named for its rounding
    and reused. The blocks wait on disk in the store's folder until its units are written, and are gone after.
    With a rotation, GPTQ rounds W R against Rᵀ H R and the store turns the blocks back by Rᵀ."""
    from tierstore import rotation
    from tierstore.inference import compose
    from tierstore.inference.loading import spill

    made: dict[str, torch.Tensor] = {}
    parked: list[str] = []
    measure = compose.measure_rounding
    monkeypatch.setattr(spill, "SPILL_BYTES", 0)  # a tiny model's blocks are parked too

    def kept(*args, **kwargs):
        results = measure(*args, **kwargs)
        assert isinstance(results, spill.SpilledTensors) and results.directory.endswith(".parked")
        parked.append(results.directory)
        assert len(os.listdir(results.directory)) == len(results)  # every block, error and importance on disk
        made.update(results)
        return results
    monkeypatch.setattr(compose, "measure_rounding", kept)
    directory, original = tiny_dirs("llama")
    recipe, rotated = recipe.split("+")[0], recipe.endswith("+rotation")
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")},
              "compression": {"format": recipe, "calibration": "bundled", "rounding": "gptq", "bits": 5.0,
                              "rotation": "hadamard" if rotated else "none"}}
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        codec, packed = model.store.source.codec, model.store.source.packed
        got = model.generate(IDS, max_new_tokens=10, do_sample=False).tolist()
        logits = model(IDS).logits
    formats = {name: entry[0] for unit in packed.values() for name, entry in unit.formats.items()}
    assert codec.rounding == "gptq" and "-gptq-" in codec.name and len(formats) == 4 * 7
    assert codec.name.endswith("-rot") == rotated
    assert len(parked) == 1 and not os.path.exists(parked[0]) and os.path.isdir(os.path.dirname(parked[0]))
    if recipe == "mixed":
        assert len(set(formats.values())) > 1 and dict(codec.allocation) == formats
    reference = copy.deepcopy(original)
    differs = 0
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in formats:
                blocks = made[blocks_key(name, formats[name])]
                restored = torch.empty(param.numel())
                ggml.dequantize(formats[name], blocks, restored)
                weight = original.get_parameter(name).data
                if rotated and rotation.applies(tuple(param.shape)):
                    turn = rotation.rotate(torch.eye(param.shape[1]), name)  # R
                    restored, weight = restored.view_as(param) @ turn.T, rotation.rotate(weight, name)
                param.copy_(restored.view_as(param))
                differs += not torch.equal(blocks, ggml_quantize.quantize(formats[name], weight.reshape(-1)))
    assert differs > len(formats) // 2
    assert got == reference.generate(IDS, max_new_tokens=10, do_sample=False).tolist()
    torch.testing.assert_close(logits, reference(IDS).logits, atol=1e-5, rtol=1e-5)
    made.clear()
    with tierstore.AutoModel.from_pretrained(directory, config=config) as again:  # reused: nothing measured
        assert again.store.source.codec == codec and not made


@pytest.mark.parametrize("model_type", ["qwen3", "gemma", "phi3", "mixtral", "mixtral+rotation", "phi3+rotation"])
def test_gptq_rounds_every_decoder_linear_of_each_architecture(model_type, tiny_dirs, tmp_path, monkeypatch,
                                                               token_calibration):
    """Across architectures (phi3's fused projections, mixtral's experts, which are no nn.Linear): every
    decoder-layer nn.Linear is stored as the blocks GPTQ made for it, any other matrix rounded to nearest, and the
    tokens are transformers' with those blocks dequantized (and, rotated, turned back by Rᵀ written out here;
    mixtral's experts, units of their own, each expert's matrices rotated and turned back too)."""
    from torch import nn

    from tierstore import rotation
    from tierstore.inference import compose

    made: dict[str, torch.Tensor] = {}
    measure = compose.measure_rounding
    monkeypatch.setattr(compose, "measure_rounding", lambda *a, **k: made.update(measure(*a, **k)) or made)
    model_type, rotated = model_type.split("+")[0], model_type.endswith("+rotation")
    directory, original = tiny_dirs(model_type)
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")},
              "compression": {"format": "q4_k", "calibration": "bundled", "rounding": "gptq",
                              "rotation": "hadamard" if rotated else "none"}}
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        packed = model.store.source.packed
        got = model.generate(IDS, max_new_tokens=8, do_sample=False).tolist()
    formats = {name: entry[0] for unit in packed.values() for name, entry in unit.formats.items()}
    linears = {f"{name}.weight" for name, module in original.named_modules()
               if isinstance(module, nn.Linear) and ".layers." in name}
    assert linears and {name for name in formats if blocks_key(name, formats[name]) in made} == linears
    reference = copy.deepcopy(original)
    turned = 0
    with torch.no_grad():
        for whole, param in reference.named_parameters():
            # a matrix, or each expert's slice of a fused experts tensor (experts are units of their own)
            pieces = [(whole, param.data)] if whole in formats else \
                [(f"{whole}[{e}]", param.data[e]) for e in range(param.shape[0]) if f"{whole}[{e}]" in formats]
            for name, data in pieces:
                turn = rotated and rotation.applies(tuple(data.shape))
                blocks = made.get(blocks_key(name, formats[name]))
                if blocks is None:  # no nn.Linear (mixtral's experts): no importance either, the data-free search
                    weight = rotation.rotate(data, name) if turn else data
                    blocks = ggml_quantize.quantize(formats[name], weight.reshape(-1))
                restored = torch.empty(data.numel())
                ggml.dequantize(formats[name], blocks, restored)
                restored = restored.view_as(data)
                if turn:
                    restored, turned = restored @ rotation.rotate(torch.eye(data.shape[1]), name).T, turned + 1
                data.copy_(restored)
    assert turned >= (len(linears) if rotated else 0) and (turned == 0) != rotated
    assert got == reference.generate(IDS, max_new_tokens=8, do_sample=False).tolist()


def test_gptq_rounding_is_refused_where_it_cannot_apply(tiny_dirs, tmp_path, capsys):
    """gptq without a calibration text, or with nf4, and an unknown rounding: one line each, exit 2 from the CLI."""
    from tierstore.inference.front.cli import main

    directory, _ = tiny_dirs("llama")
    capsys.readouterr()  # what making the fixture printed
    for body, message in (('format = "q4_k"\nrounding = "gptq"', "compression.rounding = gptq fits codes"),
                          ('format = "nf4"\nrounding = "gptq"\ncalibration = "bundled"',
                           "compression.rounding = gptq fits codes"),
                          ('format = "q4_k"\nrounding = "best"', "compression.rounding: 'best' is not allowed")):
        path = tmp_path / "c.toml"
        path.write_text(f'[runtime]\ncache_dir = "{tmp_path / "cache"}"\n[compression]\n{body}\n')
        assert main(["plan", directory, "--vram", "1MB", "--ram", "1MB", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="compression.rounding = gptq fits codes"):
        Codec.create("q4_k", rounding="gptq")


@pytest.mark.parametrize("rows,columns", [(24, 300), (300, 24)])
def test_the_column_loop_rounds_as_gptq_written_plainly(rows, columns):
    """`_round_columns` (transposed, in place, batched lazily) against GPTQ's loop as the paper gives it: each
    column rounded on its grid, its error over H^-1's diagonal folded at once into every later column. The codes
    agree but for the odd rounding tie their different summation orders move; a zero step keeps its code 0."""
    from tierstore.gptq import _inverse_cholesky, _round_columns

    generator = torch.Generator().manual_seed(7)
    w = torch.randn(rows, columns, generator=generator) * 0.02
    inputs = _correlated_inputs(columns, tokens=2048)
    h = inputs.T @ inputs
    upper = _inverse_cholesky(h + 0.1 * h.diagonal().mean() * torch.eye(columns))
    step = torch.full((rows, columns), 0.004)
    step[:, 3] = 0
    offset = torch.full((rows, columns), 0.03)
    plain, codes = w.clone(), torch.empty_like(w)
    for j in range(columns):
        code = torch.where(step[:, j] != 0, torch.round((plain[:, j] + offset[:, j]) / torch.where(
            step[:, j] != 0, step[:, j], 1.0)).clamp(0, 15), 0.0)
        error = (plain[:, j] - (code * step[:, j] - offset[:, j])) / upper[j, j]
        plain[:, j + 1:] -= error[:, None] * upper[j, j + 1:][None, :]
        codes[:, j] = code
    got = _round_columns(w.t().contiguous(), upper, step.t().contiguous(), offset.t().contiguous(), 0, 15).t()
    assert got.shape == (rows, columns)
    assert (got == codes).float().mean() > 0.99
    assert torch.equal(got[:, 3], torch.zeros(rows))
