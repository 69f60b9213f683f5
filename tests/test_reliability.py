"""Budgets that hold, seen from outside the process; budgets above the machine; Ctrl-C loses nothing."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import unit_sizes
from tierstore.inference.front.cli import main

import tierstore

SMOLLM2_RUN = textwrap.dedent("""
    import sys, torch, tierstore
    store, mode, vram, ram = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(2)
    with tierstore.AutoModel.from_pretrained(store, budget=tierstore.Budget(vram=vram, ram=ram),
                                             config={"runtime": {"cache_dir": sys.argv[5]}}) as model:
        ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
        if mode == "run":
            model.generate(ids, max_new_tokens=8, do_sample=False)
    with open("/proc/self/status") as status:
        print(next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:")))
""")


def _peak_rss(*args: str) -> int:
    result = subprocess.run([sys.executable, "-c", SMOLLM2_RUN, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_stays_within_the_budgets(smollm2_store, tmp_path):
    store_dir, _ = smollm2_store
    from tierstore.inference.loading.layerstore import read_manifest

    sizes = {key: unit["nbytes"] for key, unit in read_manifest(store_dir)["units"].items()}
    model_bytes = sum(sizes.values())
    vram = sizes["embed_tokens"] + 3 * sizes["layers.0"] + 8192
    ram = 200 * 10**6
    assert vram + ram < model_bytes
    args = (store_dir, str(vram), str(ram), str(tmp_path))
    baseline = _peak_rss(store_dir, "baseline", *args[1:])  # the same process, no weights loaded
    run = _peak_rss(store_dir, "run", *args[1:])
    slack = 64 * 2**20  # activations, KV cache and logits of 8 tokens, allocator rounding
    print(f"\npeak RSS: baseline {baseline / 1e6:.0f} MB, run {run / 1e6:.0f} MB, budgets {(vram + ram) / 1e6:.0f} "
          f"MB, model {model_bytes / 1e6:.0f} MB")
    assert run - baseline <= vram + ram + slack
    assert run - baseline < model_bytes


def test_budget_above_the_machine_is_capped_and_said(tiny_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["plan", tiny_dirs("llama")[0], "--vram", "300KB", "--ram", "900TB"]) == 0
    out = capsys.readouterr().out
    assert "more than the" in out and "capped by" in out
    with tierstore.AutoModel.from_pretrained(tiny_dirs("llama")[0], budget=tierstore.Budget(vram="400KB", ram="900TB"),
                                             config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        assert any("capped by" in note for note in model.plan.notes)
        assert model.plan.host_budget_bytes < 900 * 2**40


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 3))
def test_report_peaks_never_exceed_randomized_budgets(tiny_dirs, tmp_path, device_layers, host_layers, depth):
    """Budgets from the model's own unit sizes: each tier holds the largest unit and some layers, so every example
    runs (none is refused), and no tier's peak passes its budget."""
    directory, _ = tiny_dirs("llama")
    largest, layer = unit_sizes(directory, str(tmp_path))
    budget = tierstore.Budget(vram=largest + device_layers * layer, ram=largest + host_layers * layer)
    config = {"runtime": {"cache_dir": str(tmp_path)}, "policy": {"prefetch_depth": depth}}
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as model:
        model.generate(torch.tensor([[5, 9, 33, 7]]), max_new_tokens=6, do_sample=False)
        for name, stats in model.report().tiers.items():
            assert stats.budget_bytes is None or stats.peak_bytes <= stats.budget_bytes, name


def _tree(root: str) -> dict[str, tuple[int, int]]:
    return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(root) for f in files}


@pytest.mark.slow
def test_ctrl_c_during_generation_ends_cleanly_and_modifies_nothing(smollm2_store, tmp_path):
    store_dir, _ = smollm2_store
    before = _tree(store_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "tierstore", "generate", store_dir, "--prompt",
                             "Tell me a long story about the sea.", "--max-new-tokens", "400", "--vram", "200MB",
                             "--ram", "250MB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            # a shell's background job ignores SIGINT, and its children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    first = proc.stdout.read(1)  # generation has started streaming
    assert first
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert err.decode().strip() == "tierstore: interrupted"
    assert _tree(store_dir) == before
