"""`tierstore eval`: what a compression format costs, measured teacher-forced against the uncompressed model."""
import json
import math

import pytest
import torch
from tierstore.inference.front.cli import main
from tierstore.inference.front.quality import Agreement, bundled_text, windows


def test_agreement_sums_match_torch_over_windows():
    torch.manual_seed(0)
    agreement = Agreement()
    reference, logprobs, targets = [], [], []
    for positions in (7, 5):
        ref = torch.randn(positions, 11).log_softmax(-1)
        got = (ref + 0.3 * torch.randn(positions, 11)).log_softmax(-1)
        tgt = torch.randint(0, 11, (positions,))
        agreement.add(ref, got, tgt)
        reference.append(ref), logprobs.append(got), targets.append(tgt)
    ref, got, tgt = torch.cat(reference), torch.cat(logprobs), torch.cat(targets)
    summary = agreement.summary()
    kl = torch.nn.functional.kl_div(got, ref, log_target=True, reduction="none").sum(-1)
    assert summary["tokens"] == 12
    assert summary["top1_agreement"] == pytest.approx((ref.argmax(-1) == got.argmax(-1)).float().mean().item())
    assert summary["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert summary["kl_p99"] == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(-got.gather(1, tgt[:, None]).mean().item()), rel=1e-5)
    assert summary["reference_perplexity"] == pytest.approx(math.exp(-ref.gather(1, tgt[:, None]).mean()), rel=1e-5)


def test_windows_cover_the_text_and_drop_a_lone_last_token():
    ids = torch.arange(11)
    assert [w.tolist() for w in windows(ids, 5)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [w.numel() for w in windows(torch.arange(12), 5)] == [5, 5, 2]
    assert "def " in bundled_text() and len(bundled_text().split()) > 2000


@pytest.mark.slow
def test_eval_ranks_formats_on_smollm2(smollm2_store, tmp_path, capsys):
    """The model against itself agrees exactly; int8 agrees more than nf4 and moves perplexity less."""
    out = tmp_path / "eval.json"
    config = tmp_path / "c.toml"
    config.write_text(f'[runtime]\ncache_dir = "{tmp_path / "cache"}"\n')
    code = main(["eval", smollm2_store[0], "--formats", "none,int8,nf4", "--max-tokens", "300", "--window", "128",
                 "--json", str(out), "--config", str(config)])
    assert code == 0
    rows = {row["format"]: row for row in json.loads(out.read_text())["formats"]}
    assert rows["none"]["top1_agreement"] == 1.0 and rows["none"]["kl_mean"] < 1e-6
    assert rows["none"]["bits_per_weight"] is None and rows["nf4"]["bits_per_weight"] == 4.5
    assert all(row["tokens"] == 299 - 2 for row in rows.values())  # three windows, each predicts all but its first
    assert rows["int8"]["top1_agreement"] > 0.9 > rows["nf4"]["top1_agreement"]
    assert rows["int8"]["kl_mean"] < rows["nf4"]["kl_mean"] / 10
    assert abs(rows["int8"]["perplexity_change"]) < abs(rows["nf4"]["perplexity_change"])
    assert "top-1 agreement" in capsys.readouterr().out
    assert not list((tmp_path / "cache").glob("eval-*"))  # the reference's log-probabilities are removed


@pytest.mark.parametrize("argv, words", [
    (["--text", "/nonexistent/t.txt"], "--text '/nonexistent/t.txt'"),
    (["--formats", "nf3"], "--formats: 'nf3' is not a format"),
    (["--window", "1"], "--window must be at least 2"),
    (["--compress", "nf4"], "--compress does not apply"),
])
def test_eval_refuses_bad_input_in_one_line(smollm2_store, tmp_path, capsys, argv, words):
    config = tmp_path / "c.toml"
    config.write_text(f'[runtime]\ncache_dir = "{tmp_path / "cache"}"\n')
    assert main(["eval", smollm2_store[0], "--config", str(config), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_eval_refuses_an_empty_text_and_a_compressed_reference(smollm2_store, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'[runtime]\ncache_dir = "{tmp_path / "cache"}"\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["eval", smollm2_store[0], "--config", str(config), "--text", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["convert", smollm2_store[0], str(tmp_path / "s"), "--eval"]) == 2
    assert "give --compress too" in capsys.readouterr().err
    assert main(["convert", smollm2_store[0], str(tmp_path / "s"), "--compress", "int8"]) == 0
    assert main(["eval", str(tmp_path / "s"), "--config", str(config), "--formats", "none"]) == 2
    assert "is stored compressed (int8-256)" in capsys.readouterr().err


def test_importance_covers_every_layer_linear(smollm2_store, tmp_path):
    """The importance matrix: one mean square per input feature of every decoder-layer linear."""
    import torch
    from tierstore.inference.decoding.importance import measure_importance

    import tierstore
    from tierstore.calibration import calibration_text

    config = {"runtime": {"cache_dir": str(tmp_path)}}
    with tierstore.AutoModel.from_pretrained(smollm2_store[0], config=config) as model:
        linears = {f"{name}.weight": module.in_features for name, module in model.model.named_modules()
                   if isinstance(module, torch.nn.Linear) and ".layers." in name}
        importance = measure_importance(model, calibration_text("bundled")[:2000])
    assert len(linears) == 30 * 7
    assert {name: len(value) for name, value in importance.items()} == linears
    assert all((value >= 0).all() and value.sum() > 0 for value in importance.values())


def test_a_calibration_names_its_store_and_is_refused_where_it_cannot_apply(tmp_path):
    from tierstore.inference.loading.store_writer import write_store

    from tierstore.compression import Codec
    from tierstore.config import Config
    from tierstore.errors import ConfigError, InputError

    plain = Codec.wanted(Config.load({"compression": {"format": "q4_k"}}).compression)
    fitted = Codec.wanted(Config.load({"compression": {"format": "q4_k", "calibration": "bundled"}}).compression)
    own = tmp_path / "text.txt"
    own.write_text("Another calibration text, about rivers and mills.")
    other = Codec.wanted(Config.load({"compression": {"format": "q4_k", "calibration": str(own)}}).compression)
    assert plain.name == "q4_k" and fitted.name.startswith("q4_k-imatrix-") and other.name != fitted.name
    assert Codec.from_dict(fitted.to_dict(), "m") == fitted
    with pytest.raises(ConfigError, match="compression.calibration applies to the GGML formats"):
        Codec.wanted(Config.load({"compression": {"format": "nf4", "calibration": "bundled"}}).compression)
    with pytest.raises(ConfigError, match="compression.calibration: cannot read"):
        Codec.wanted(Config.load({"compression": {"format": "q4_k", "calibration": str(tmp_path / "no")}}).compression)
    with pytest.raises(InputError, match="write_store quantizes data-free"):
        write_store(str(tmp_path / "s"), None, lambda key, names: {}, "float32", codec=fitted)


@pytest.mark.slow
def test_a_calibrated_q4_k_agrees_more_than_the_data_free_one(smollm2_off_grid, tmp_path):
    """Fitted to the bundled calibration text (not the text eval reads), q4_k's KL from the model drops, and
    drops again with GPTQ's rounding, in the same bits. (On SmolLM2's own weights the data-free and importance
    searches find the Q4_1 grid they lie on, and agree exactly.)"""
    out = tmp_path / "eval.json"
    config = tmp_path / "c.toml"
    config.write_text(f'[runtime]\ncache_dir = "{tmp_path / "cache"}"\n[compression]\ncalibration = "bundled"\n')
    plain = tmp_path / "plain.toml"
    plain.write_text(f'[runtime]\ncache_dir = "{tmp_path / "cache"}"\n')
    gptq = tmp_path / "gptq.toml"
    gptq.write_text(config.read_text() + 'rounding = "gptq"\n')
    rows = {}
    for name, path in (("fitted", config), ("plain", plain), ("gptq", gptq)):
        assert main(["eval", smollm2_off_grid, "--formats", "q4_k", "--max-tokens", "400", "--window", "200",
                     "--json", str(out), "--config", str(path)]) == 0
        rows[name] = json.loads(out.read_text())["formats"][0]
    assert rows["fitted"]["format"] == "q4_k+imatrix" and rows["plain"]["format"] == "q4_k"
    assert rows["gptq"]["format"] == "q4_k+gptq" and rows["gptq"]["bits_per_weight"] == 4.5
    assert rows["gptq"]["kl_mean"] < rows["fitted"]["kl_mean"] < rows["plain"]["kl_mean"]
    assert len(list((tmp_path / "cache").glob("*q4_k-imatrix-*"))) == 1  # a store of its own
    assert len(list((tmp_path / "cache").glob("*q4_k-gptq-*"))) == 1
