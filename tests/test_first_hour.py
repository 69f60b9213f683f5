"""What a new user meets in the first hour: conversions that refuse clearly and leave nothing behind, the API
accepting what people naturally pass, a CLI that explains itself, and a report that counts one call."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tierstore
from tierstore.inference.front.cli import main

IDS = torch.tensor([[5, 9, 33, 7, 81]])


@pytest.fixture
def tiny(tiny_dirs):
    return tiny_dirs("llama")


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


# -- conversion ---------------------------------------------------------------------------------------------
def test_convert_into_a_store_of_another_dtype_is_refused_and_keeps_it(tiny, tmp_path, capsys):
    out = str(tmp_path / "store")
    assert main(["convert", tiny[0], out, "--dtype", "float16"]) == 0
    before = {name: os.path.getsize(os.path.join(out, name)) for name in _files(out)}
    capsys.readouterr()
    assert main(["convert", tiny[0], out, "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "already holds a layer store in float16, not in bfloat16" in err and err.count("\n") == 1
    assert main(["convert", tiny[0], out, "--compress", "int8"]) == 2
    assert "not int8-compressed" in capsys.readouterr().err
    assert {name: os.path.getsize(os.path.join(out, name)) for name in _files(out)} == before
    assert main(["convert", tiny[0], out, "--dtype", "float16"]) == 0  # the same conversion again: reused


def test_disk_budget_is_enforced_before_anything_is_written(tiny, tmp_path, capsys):
    config = tmp_path / "small-disk.toml"
    config.write_text('[budget]\ndisk = "10KB"\n')
    out = tmp_path / "store"
    assert main(["convert", tiny[0], str(out), "--dtype", "float16", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "budget.disk is 10KB" in err and "bytes" in err and err.count("\n") == 1
    assert not out.exists()


def test_disk_budget_caps_the_conversion_from_pretrained_does(smollm2_store, tmp_path):
    _, gguf = smollm2_store
    cache = tmp_path / "cache"
    with pytest.raises(tierstore.BudgetError, match="budget.disk is 100MB"):
        tierstore.AutoModel.from_pretrained(gguf, budget={"disk": "100MB"},
                                            config={"runtime": {"cache_dir": str(cache)}})
    assert not cache.exists() or _files(cache) == []


@pytest.mark.parametrize("kind", ["junk_gguf", "wrong_weights"])
def test_bad_input_leaves_nothing_in_the_cache(kind, tiny, tmp_path):
    cache = tmp_path / "cache"
    if kind == "junk_gguf":
        model = tmp_path / "junk.gguf"
        model.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(4096))
    else:  # a .bin checkpoint whose tensors have the wrong names: conversion fails after reading it
        model = tmp_path / "wrongw"
        model.mkdir()
        (model / "config.json").write_text(open(os.path.join(tiny[0], "config.json")).read())
        torch.save({"nothing.weight": torch.zeros(4)}, model / "pytorch_model.bin")
    with pytest.raises(tierstore.TierstoreError):
        tierstore.AutoModel.from_pretrained(str(model), config={"runtime": {"cache_dir": str(cache)}})
    assert not cache.exists() or os.listdir(cache) == [] or _files(cache) == ["probe.json"]


# -- the API --------------------------------------------------------------------------------------------------
def test_api_takes_a_dtype_name_and_a_dict_budget(tiny, tmp_path):
    directory, reference = tiny
    want = reference.generate(IDS, max_new_tokens=4, do_sample=False).tolist()
    with tierstore.AutoModel.from_pretrained(directory, budget={"vram": "400KB", "ram": "1MB"}, dtype="float32",
                                             config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        assert model.plan.device_budget_bytes == 400_000 and model.model.dtype == torch.float32
        assert model.generate(IDS, max_new_tokens=4, do_sample=False).tolist() == want
        assert repr(model).startswith("TierstoreModel(llama, cpu, torch.float32, device budget 400KB")


@pytest.mark.parametrize("bad, words", [({"dtype": "float13"}, "dtype 'float13' is not supported"),
                                        ({"budget": {"vrm": "4GB"}}, "unknown tier 'vrm'"),
                                        ({"budget": "4GB"}, "expected tierstore.Budget")])
def test_api_refuses_bad_arguments_by_name(bad, words, tiny, tmp_path):
    with pytest.raises(tierstore.TierstoreError, match=words):
        tierstore.AutoModel.from_pretrained(tiny[0], config={"runtime": {"cache_dir": str(tmp_path)}}, **bad)


def test_generate_after_close_and_out_of_vocabulary_ids_are_named(tiny, tmp_path):
    model = tierstore.AutoModel.from_pretrained(tiny[0], config={"runtime": {"cache_dir": str(tmp_path)}})
    with pytest.raises(tierstore.InputError, match="token id 256 is outside the vocabulary"):
        model.generate(torch.tensor([[1, 256]]), max_new_tokens=2)
    with pytest.raises(tierstore.InputError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    model.close()
    model.close()  # twice is fine
    with pytest.raises(tierstore.InputError, match="closed"):
        model.generate(IDS, max_new_tokens=2)
    assert "closed" in repr(model)


# -- the CLI --------------------------------------------------------------------------------------------------
def test_version_usage_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"tierstore {tierstore.__version__}"
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tierstore") and "generate" in out and "convert" in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: 32)" in capsys.readouterr().out


def test_verbose_logs_each_step(tiny, tmp_path):
    result = subprocess.run([sys.executable, "-m", "tierstore", "-v", "generate", tiny[0], "--prompt", "hi",
                             "--max-new-tokens", "2", "--no-chat-template"],
                            capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    # the tiny model ships no tokenizer: the run stops there, after resolving and planning were logged
    logged = [line for line in result.stderr.splitlines() if line.startswith("tierstore: ") and "error" not in line]
    assert any("safetensors checkpoint" in line for line in logged), result.stderr
    assert any(line.startswith("tierstore: plan ") for line in logged), result.stderr


def test_sampling_is_fresh_unless_seeded_and_says_its_seed(smollm2_store, tmp_path):
    store_dir, _ = smollm2_store
    out = tmp_path / "report.json"

    def run(*extra):
        code = main(["generate", store_dir, "--prompt", "Tell me a story.", "--temperature", "1.0",
                     "--max-new-tokens", "12", "--report-json", str(out), *extra])
        assert code == 0
        data = json.loads(out.read_text())
        seed = next(int(note.split()[3]) for note in data["notes"] if note.startswith("sampled with seed"))
        return seed, data["tokens"]

    first, second = run(), run()
    assert first[0] != second[0]  # a fresh seed each run (two equal 31-bit draws: one in two billion)
    assert run("--seed", str(first[0])) == first  # the printed seed repeats the run


# -- the report ---------------------------------------------------------------------------------------------
def test_report_counts_the_last_call_and_the_disk_bytes_it_served(tiny, tmp_path):
    with tierstore.AutoModel.from_pretrained(tiny[0], budget=tierstore.Budget(vram="400KB", ram="300KB"),
                                             config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        assert model.plan.streamed_from_disk
        model.generate(IDS, max_new_tokens=6, do_sample=False)
        model.generate(IDS, max_new_tokens=3, do_sample=False)
        tiers = model.report().tiers
        units_per_pass = len(model.plan.schedule)
    assert tiers["device"].hits + tiers["device"].misses == 3 * units_per_pass
    assert tiers["disk"].hits > 0 and tiers["disk"].bytes_out >= tiers["disk"].hits * 1000
    assert "bytes out" in str(model.report())


def test_on_a_cpu_both_budgets_share_the_free_ram_and_a_unit_is_held_once(tiny, tmp_path):
    from tierstore.inference.placement.budgets import effective_budgets

    free = 1_000_000_000
    measured = tierstore.Budget(vram=0, ram=free)
    device, host, notes = effective_budgets(tierstore.Budget(vram="800MB", ram="800MB"), measured,
                                            torch.device("cpu"))
    assert device == 800_000_000 and host == free - device and any("beside the device tier" in n for n in notes)
    with tierstore.AutoModel.from_pretrained(tiny[0], budget=tierstore.Budget(vram="1GB", ram="1GB"),
                                             config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        model.generate(IDS, max_new_tokens=3, do_sample=False)
        assert model.plan.regime == "device"
        assert model.store.host.used_bytes == 0  # every unit resident on the device: none kept in the host tier
        predicted = model.report().to_dict()["plan"]["predicted"]
    assert predicted["step_s"] is None and "CPU" in predicted["unknown"]


def test_a_half_precision_store_run_in_float32_on_a_cpu_says_so(tmp_path):
    from conftest import tiny_model

    half = tmp_path / "half"
    model = tiny_model("llama").to(torch.float16)
    model.config.dtype = torch.float16
    model.save_pretrained(half)
    with tierstore.AutoModel.from_pretrained(str(half), config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        assert any("stored in float16 run in float32 on the CPU" in note for note in model.plan.notes)
