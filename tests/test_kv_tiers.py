"""The KV cache as a tier: layers in host RAM and on disk give the device cache's tokens, the planner places each
layer's share by what the budgets hold, and a disk layer leaves no file behind."""
import dataclasses
import os

import pytest
import torch
from tierstore.inference.placement.budgets import ACTIVATION_SLACK_BYTES
from tierstore.inference.placement.kv import Workload, _spread, describe_tiers
from tierstore.inference.runtime.tiered_kv import TieredKVCache
from tierstore.policies.planner import make_plan
from transformers import DynamicCache

import tierstore
from tierstore.errors import BudgetError

PROMPT = torch.tensor([[(5 * i + 2) % 250 + 3 for i in range(40)]])


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma"])
@pytest.mark.parametrize("tiers", [("disk",), ("host",), ("device", "disk", "host", "disk")])
def test_layers_off_the_device_give_the_device_caches_logits(model_type, tiers, tiny_dirs, tmp_path):
    """Every mix of tiers, prompt fed in chunks and then token by token: logits equal a plain DynamicCache's."""
    _, reference = tiny_dirs(model_type)
    config = reference.config
    layers = config.num_hidden_layers
    tiers = (tiers * layers)[:layers]
    ids = torch.cat([PROMPT, PROMPT.flip(1)], dim=0)  # two rows
    plain, tiered = DynamicCache(config=config), TieredKVCache(config, tiers, 60, torch.device("cpu"), str(tmp_path))
    with torch.no_grad():
        for start, end in ((0, 17), (17, 40), (40, 41), (41, 42)):  # chunks, then single tokens
            chunk = ids[:, start:end] if end <= 40 else (ids[:, :1] + end) % 250
            want = reference(chunk, past_key_values=plain).logits
            got = reference(chunk, past_key_values=tiered).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert tiered.get_seq_length() == 42
    traffic = tiered.traffic
    off_device = sum(tier != "device" for tier in tiers)
    assert traffic.passes == 4
    if "disk" in tiers:  # each disk layer's rows were written once and read back on every later pass
        assert traffic.disk_write_bytes > 0 and traffic.disk_read_bytes > traffic.disk_write_bytes
    if "host" in tiers:
        assert traffic.h2d_bytes > 0 and traffic.d2h_bytes > 0
    assert set(tiered.tier_bytes()) == set(tiers) and off_device
    tiered.close()
    assert os.listdir(tmp_path) == []  # the files were unlinked when opened


def test_disk_cache_through_generate_gives_transformers_tokens(tiny_dirs, cache_config, tmp_path):
    """`runtime.kv_cache = disk` on a CPU: every layer's KV in kv_dir, same greedy tokens, the report says so."""
    directory, reference = tiny_dirs("llama")
    want = reference.generate(PROMPT, max_new_tokens=8, do_sample=False)
    kv_dir = tmp_path / "kv"
    config = {"runtime": {**cache_config["runtime"], "kv_cache": "disk", "kv_dir": str(kv_dir), "prefill_chunk": 9}}
    with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
        got = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        kv = model.report().to_dict()["kv"]
    assert got.tolist() == want.tolist()
    layers = reference.config.num_hidden_layers
    assert kv["tier"] == f"{layers} disk" and kv["tier_bytes"] == {"disk": kv["bytes"]}
    assert kv["disk_bytes_per_pass"] > 0 and kv["moved_bytes_per_pass"] == 0  # a CPU has no link
    assert kv["prompt_chunk_tokens"] == 9
    assert not os.listdir(kv_dir)


def test_placement_fills_ram_then_disk_and_keeps_disk_layers_on_the_device(tiny_dirs, cache_config, tmp_path):
    """As for a GPU: a cache the device budget holds stays there; past it, host RAM takes what its room holds and
    disk the rest, and device room beyond the layers in use keeps disk-bound layers in place of weights."""
    directory, reference = tiny_dirs("llama")
    layers = reference.config.num_hidden_layers
    with tierstore.AutoModel.from_pretrained(directory, config=cache_config) as model:
        gpu = dataclasses.replace(model.kv_budget, separate_device=True, disk_dir=str(tmp_path))
        weights = sum(unit.nbytes for unit in gpu.plan_input.units)
        tokens = 100_000
        cache, per_layer = gpu.cache_bytes(tokens), gpu.cache_bytes(tokens) // layers
        device = ACTIVATION_SLACK_BYTES + 3 * per_layer + 2 * weights  # three layers: two in use, one kept

        def budget_with(ram: int, where: str = "auto"):
            planned = dataclasses.replace(gpu.plan_input, device_budget_bytes=device, host_budget_bytes=weights + ram)
            return dataclasses.replace(gpu, plan_input=planned, where=where, host_weights_bytes=weights), \
                make_plan(planned)

        budget, plan = budget_with(cache + 3 * per_layer)
        assert budget.placement(plan, 1000)[0] is None  # a small cache fits the device reserve
        tiers, replanned = budget.placement(plan, tokens)
        assert tiers == ("host",) * layers  # RAM holds it: a device byte of KV saves no more than one of weights
        assert replanned.device_reserve_bytes >= 2 * per_layer + ACTIVATION_SLACK_BYTES
        budget, plan = budget_with(3 * per_layer)  # room for one layer beside the two bounce buffers
        tiers, replanned = budget.placement(plan, tokens)
        assert describe_tiers(tiers) == f"1 device, 1 host, {layers - 2} disk"
        assert replanned.device_reserve_bytes >= 3 * per_layer + ACTIVATION_SLACK_BYTES
        assert replanned.device_reserve_bytes + replanned.device_weights_bytes <= device
        # weighed by time: a long prompt's chunks need the room more than a few tokens' decoding needs the disk
        # layer on the device; many tokens after a short prompt keep it there
        timed = dataclasses.replace(budget, plan_input=dataclasses.replace(budget.plan_input, h2d_gbps=50.0,
                                                                           disk_gbps=1.5))
        def room_chunks(plan):
            return max((plan.device_budget_bytes - plan.device_reserve_bytes) // 10_000, 1)
        long_prompt = Workload(prompt_tokens=10**6, new_tokens=1, chunk_tokens=room_chunks)
        long_answer = Workload(prompt_tokens=10, new_tokens=10**4, chunk_tokens=room_chunks)
        assert timed.placement(plan, tokens, workload=long_prompt)[0].count("device") == 0
        assert timed.placement(plan, tokens, workload=long_answer)[0].count("device") == 1
        with pytest.raises(BudgetError, match="RAM budget"):  # the batcher's cache keeps to RAM
            budget.placement(plan, tokens, tiered=False)
        with pytest.raises(BudgetError, match="RAM budget"):
            dataclasses.replace(budget, where="host").placement(plan, tokens)
        with pytest.raises(BudgetError, match="free space"):
            dataclasses.replace(budget, where="disk").placement(plan, 10**15)
        with pytest.raises(BudgetError, match="RAM budget"):  # no directory: no disk tier
            dataclasses.replace(budget, disk_dir=None).placement(plan, tokens)


def test_spread_and_description():
    assert _spread(4, 0) == ["host"] * 4 and _spread(0, 3) == ["disk"] * 3
    mixed = _spread(6, 2)
    assert mixed.count("disk") == 2 and mixed.count("host") == 6 and mixed[:2] != ["disk", "disk"]
    assert describe_tiers(("device", "host", "disk", "host")) == "1 device, 2 host, 1 disk"


def test_kv_cache_option_is_validated():
    with pytest.raises(tierstore.ConfigError, match="runtime.kv_cache"):
        tierstore.Config.from_dict({"runtime": {"kv_cache": "ssd"}})


def test_a_cache_beyond_every_tier_is_refused_naming_them(tiny_dirs, cache_config, tmp_path):
    directory, _ = tiny_dirs("llama")
    with tierstore.AutoModel.from_pretrained(directory, config=cache_config) as model:
        model.kv_budget = dataclasses.replace(model.kv_budget, separate_device=True, disk_dir=str(tmp_path))
        with pytest.raises(tierstore.InputError, match=r"leaves beside the weights, and more than .* the RAM budget "
                                                       r"leaves beside the host tier, and more than the free space of "
                                                       r".* \(runtime.kv_dir\); use fewer"):
            model.fit_kv_cache(10**14)
        assert model.kv_tiers is None and os.listdir(tmp_path) == []  # nothing placed, nothing made


def test_a_kv_dir_that_is_a_file_is_refused_in_one_line(tiny_dirs, cache_config, tmp_path):
    """Before anything runs or is written: the option is named, the file is left as it was."""
    directory, _ = tiny_dirs("llama")
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for kv_dir in (taken, taken / "kv"):
        config = {"runtime": {**cache_config["runtime"], "kv_cache": "disk", "kv_dir": str(kv_dir)}}
        with tierstore.AutoModel.from_pretrained(directory, config=config) as model:
            with pytest.raises(tierstore.InputError, match=r"runtime.kv_dir .* is not a directory"):
                model.generate(PROMPT, max_new_tokens=2, do_sample=False)
    assert taken.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["taken"]
