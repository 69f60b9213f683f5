"""Mixture-of-experts models: each routed expert is a unit, moved only when a token is routed to it.

Every MoE architecture transformers ships whose experts it dispatches through its experts interface, built tiny,
must give transformers' own greedy tokens under budgets that keep most experts off the device; the bytes the
experts' tiers move must be the routed experts' bytes, counted independently from transformers' own routing.
"""
import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import tierstore
from tierstore.inference.compose import make_plan_for
from test_architectures import PROMPT, causal_lm_types, tiny

NEW_TOKENS = 6
# Tiny configs transformers itself cannot run, made runnable. Jamba's default layout puts its first attention layer
# at 4 of 8: tiny (4 layers) it has none. DeepSeek-style models (multi-head latent attention, grouped routing) need
# their rotary size as head size and one routing group for 4 experts.
_LATENT = dict(head_dim=8, n_group=1, topk_group=1)
TINY_OVERRIDES = {"jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                expert_layer_offset=1),
                  **{name: _LATENT for name in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa",
                                                "sarvam_mla", "axk1", "axk2")}}


def _config(root, **experts):
    """Missed experts copied into slots unless asked otherwise (on a CPU, auto computes them where they are)."""
    return {"runtime": {"cache_dir": os.path.join(root, "cache"), "device": "cpu"},
            "experts": {"compute": "device", **experts}}


def _reference(model, new_tokens=NEW_TOKENS, prompt=PROMPT):
    model.set_experts_implementation("grouped_mm")  # what tierstore runs by default: the same sums
    return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0).tolist()


def _saved(model_type, tmp_path):
    """A tiny random `model_type` model and the directory it is saved in."""
    model, why = tiny(model_type, **TINY_OVERRIDES.get(model_type, {}))
    assert model is not None, why
    directory = str(tmp_path / model_type)
    model.save_pretrained(directory)
    return model, directory


def _plan_cli(tmp_path, directory, config, *options):
    """`tierstore plan` in a subprocess, with a fresh HOME."""
    return subprocess.run([sys.executable, "-m", "tierstore", "plan", directory, "--config",
                           _write_toml(tmp_path, config), *options],
                          capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})


def _units(directory, config):
    """The sizes of the dense units a streamed run keeps in its store (an untied input embedding is looked up in
    RAM then), largest last, and the experts' plan, under an unlimited budget."""
    with tierstore.AutoModel.from_pretrained(directory, config=config) as whole:
        tied = whole.model.config.get_text_config().tie_word_embeddings
        return sorted(layout.nbytes for key, layout in whole.store.layouts.items()
                      if tied or key != "embed_tokens"), whole.plan.experts


def _streaming_budget(directory, config, every_expert_in_ram=False):
    """A budget holding a quarter of the dense units and about a third of the experts on the device, and half the
    experts in RAM (or all of them): lowered until the plan keeps some experts off the device (where dense units
    are large, the planner gives the experts whatever the dense units leave)."""
    dense, experts = _units(directory, config)
    assert experts is not None, "no expert units"
    expert_total = experts.total_experts * experts.expert_bytes
    vram = dense[-1] * 3 + sum(dense) // 4 + max(expert_total // 3, 2 * experts.top_k * experts.expert_bytes)
    ram = sum(dense) + (2 * expert_total if every_expert_in_ram else expert_total // 2)
    def slots(vram_bytes):
        try:
            return make_plan_for(directory, {"vram": vram_bytes, "ram": ram}, config).experts.device_slots
        except tierstore.BudgetError:
            return None  # too small

    low, high = 0, vram  # bisect for the largest device budget that leaves a third of the experts off it
    while slots(vram) * 3 > experts.total_experts * 2 and high - low > experts.expert_bytes:
        middle = (low + high) // 2
        got = slots(middle)
        if got is None or got * 3 <= experts.total_experts * 2:
            low = middle
            vram = middle if got is not None else vram
        else:
            high = middle
    return tierstore.Budget(vram=vram, ram=ram)


def has_expert_units(model) -> bool:
    """Whether tierstore cuts this model's experts into units (transformers dispatches them through its experts
    interface); other MoE layouts (Llama 4, JetMoE, LongCat-Flash) stay whole inside their layers."""
    from tierstore.inference.loading.skeleton import build_skeleton

    try:
        return bool(build_skeleton(model.config, torch.float32, split_experts=True).experts)
    except tierstore.TierstoreError:
        return False  # a layout tierstore refuses: the architecture sweep covers it


def run_streamed(model, model_type, root, compute="device"):
    """(reference tokens, streamed tokens, plan, report) of the tiny `model`, missed experts computed as
    `compute` says."""
    want = _reference(model)
    directory = os.path.join(root, model_type)
    model.save_pretrained(directory)
    config = _config(root, compute=compute)
    budget = _streaming_budget(directory, config, every_expert_in_ram=compute == "mapped")
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as streamed:
        got = streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
        return want, got, streamed.plan, streamed.report()


@pytest.mark.parametrize("compute", ["device", "host", "mapped"])
def test_every_moe_architecture_streams_its_experts_and_matches_transformers(tmp_path, compute):
    """Missed experts copied into slots (device), computed by the CPU from host RAM (host), or read in place from
    host RAM in decode steps (mapped)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    outcomes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in causal_lm_types():
            model, _ = tiny(model_type, **TINY_OVERRIDES.get(model_type, {}))
            if model is None or not has_expert_units(model):
                continue
            try:
                want, got, plan, report = run_streamed(model, model_type, str(tmp_path), compute)
            except tierstore.TierstoreError:
                raise
            except Exception as exc:  # noqa: BLE001 - as in the architecture sweep: transformers' own run fails
                outcomes[model_type] = ("skipped", f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                continue
            experts = plan.experts
            moved_off_device = experts.device_slots < experts.total_experts
            on_host, in_place = report.experts["host_computed"], report.experts["mapped_bytes"]
            right_place = on_host > 0 if compute == "host" else on_host == 0
            right_place = right_place and (in_place > 0) == (compute == "mapped")
            outcomes[model_type] = ("pass" if got == want and moved_off_device and right_place else "FAIL",
                                    f"{experts.device_slots}/{experts.total_experts} expert slots, "
                                    f"{report.tiers['experts device'].misses} fetched, {on_host} on the CPU, "
                                    f"{in_place} bytes read in place")
    ran = {k: v for k, v in outcomes.items() if v[0] != "skipped"}
    print(f"\nMoE architectures, compute = {compute}: {sum(v[0] == 'pass' for v in ran.values())}/{len(ran)} "
          f"stream their experts and "
          f"give transformers' tokens; {len(outcomes) - len(ran)} skipped (transformers' own tiny model fails)")
    for model_type, (outcome, detail) in outcomes.items():
        print(f"  {outcome:8} {model_type:22} {detail}")
    failed = {k: v for k, v in outcomes.items() if v[0] == "FAIL"}
    assert not failed, failed
    for required in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "jamba"):
        assert outcomes.get(required, ("missing",))[0] == "pass", f"{required}: {outcomes.get(required)}"


def _routed_per_call(model, prompt, new_tokens):
    """transformers' own routing, counted: the distinct experts of each experts-module call during generate."""
    distinct = []

    def record(module, args):
        distinct.append(len(set(args[1].reshape(-1).tolist())))

    from tierstore.inference.loading.skeleton import build_skeleton

    names = {group.name for group in build_skeleton(model.config, torch.float32, split_experts=True).experts}
    handles = [module.register_forward_pre_hook(record) for name, module in model.named_modules() if name in names]
    try:
        model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()
    return distinct


def test_bytes_moved_are_the_routed_experts(tmp_path):
    """With one token's experts of room per layer call and no prediction, no expert is ever found on the device
    again (every other layer's experts went through the slots in between): each call copies exactly its routed
    experts. The copied bytes must equal the routed experts' bytes from transformers' own routing, and no other
    expert unit may be read."""
    model, directory = _saved("qwen3_moe", tmp_path)
    model.set_experts_implementation("grouped_mm")
    routed = _routed_per_call(model, PROMPT, NEW_TOKENS)
    config = _config(str(tmp_path), prefetch="none")
    dense, experts = _units(directory, config)
    dense_bytes = sum(dense)
    k, expert_bytes = experts.top_k, experts.expert_bytes
    slots_bytes = max(routed) * expert_bytes  # the largest union any call needs: no chunks, no second chance
    budget = tierstore.Budget(vram=dense_bytes + slots_bytes, ram="1GB")
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as streamed:
        assert streamed.plan.experts.device_slots == max(routed), streamed.plan.experts
        assert streamed.plan.experts.device_slots >= k
        streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        report = streamed.report()
    device = report.tiers["experts device"]
    assert report.experts["calls"] == len(routed)
    assert device.bytes_in == sum(routed) * expert_bytes
    assert device.misses == sum(routed) and device.hits == 0
    assert report.tiers["device"].bytes_in == dense_bytes  # dense units loaded once and kept: only experts move
    # read from disk once each, then served from RAM: never more than the experts routed to
    assert report.tiers["experts disk"].bytes_out <= experts.total_experts * expert_bytes


def test_a_prompt_routed_to_more_experts_than_slots_runs_in_chunks_with_the_same_tokens(tmp_path):
    model, directory = _saved("mixtral", tmp_path)
    prompt = torch.arange(3, 40).unsqueeze(0)
    want = _reference(model, prompt=prompt)
    config = _config(str(tmp_path), prefetch="none")
    dense, experts = _units(directory, config)
    budget = tierstore.Budget(vram=sum(dense) + experts.top_k * experts.expert_bytes, ram="1GB")
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as streamed:
        assert streamed.plan.experts.device_slots < experts.experts_per_layer
        got = streamed.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
        assert streamed.report().experts["chunked_calls"] > 0
        assert any("token chunks" in note for note in streamed.plan.notes)
    assert got == want


def test_prediction_is_reported_and_changes_no_token(tmp_path):
    model, why = tiny("qwen3_moe")
    assert model is not None, why
    want, got, plan, report = run_streamed(model, "qwen3_moe", str(tmp_path))
    assert got == want
    assert plan.experts.prefetch == "auto"
    recall = report.experts["prediction_recall"]
    assert recall is not None and 0.0 <= recall <= 1.0
    assert report.experts["predicted"] > 0
    text = str(report)
    assert "prediction" in text and "experts device" in text


def test_fused_experts_in_safetensors_are_read_in_place(tmp_path):
    """A checkpoint that stores the experts fused (as transformers holds them) is read where it lies: each
    expert's slice is one byte range, so no layer store is written."""
    from safetensors.torch import save_file

    model, why = tiny("qwen3_moe")
    assert model is not None, why
    want = _reference(model)
    directory = tmp_path / "fused"
    directory.mkdir()
    model.config.save_pretrained(directory)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()
               if name != "lm_head.weight" or not model.config.tie_word_embeddings},
              str(directory / "model.safetensors"))
    config = _config(str(tmp_path))
    with tierstore.AutoModel.from_pretrained(str(directory), config=config) as streamed:
        assert type(streamed.store.source).__name__ == "SafetensorsSource"
        got = streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
    assert got == want
    assert not os.path.exists(tmp_path / "cache")


def test_conversion_writes_one_file_per_expert_and_streaming_off_keeps_whole_layers(tmp_path):
    model, directory = _saved("mixtral", tmp_path)  # per-expert names on disk: converted once
    want = _reference(model)
    config = _config(str(tmp_path))
    with tierstore.AutoModel.from_pretrained(directory, config=config) as streamed:
        store_dir = streamed.store.source.directory
        assert streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist() == want
    with open(os.path.join(store_dir, "manifest.json")) as handle:
        units = json.load(handle)["units"]
    experts = [key for key in units if ".experts." in key]
    assert len(experts) == model.config.num_hidden_layers * model.config.num_local_experts
    assert all(os.path.isfile(os.path.join(store_dir, units[key]["file"])) for key in experts)
    whole = _config(str(tmp_path), streaming=False)
    with tierstore.AutoModel.from_pretrained(directory, config=whole) as layered:
        assert layered.plan.experts is None and layered.experts is None
        assert layered.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist() == want


def test_a_budget_without_room_for_one_tokens_experts_is_refused_in_one_line(tmp_path):
    model, directory = _saved("mixtral", tmp_path)
    config = _config(str(tmp_path))
    dense, experts = _units(directory, config)
    too_small = dense[-1] + experts.expert_bytes  # one expert, where a token needs top_k
    with pytest.raises(tierstore.BudgetError, match=r"experts one token needs .* needs at least \d+ bytes"):
        tierstore.AutoModel.from_pretrained(directory, budget={"vram": too_small, "ram": "1GB"}, config=config)
    cli = _plan_cli(tmp_path, directory, config, "--vram", str(too_small), "--ram", "1GB")
    assert cli.returncode == 2, cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1 and "experts one token needs" in cli.stderr
    assert "Traceback" not in cli.stderr


def test_plan_shows_expert_placement_and_bytes_per_pass(tmp_path):
    model, directory = _saved("qwen3_moe", tmp_path)
    config = _config(str(tmp_path))
    cli = _plan_cli(tmp_path, directory, config, "--ram", "1GB")
    assert cli.returncode == 0, cli.stderr
    out = " ".join(cli.stdout.split())
    assert "experts placement" in out and "expert bytes per pass, batch 1" in out
    assert "expert bytes per pass, batch 32" in out


def _write_toml(tmp_path, config):
    path = tmp_path / "config.toml"
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_the_prefetch_gate_stops_guessing_while_its_copies_go_unused():
    from tierstore.inference.runtime.experts import PrefetchGate

    assert not PrefetchGate("none").wanted() and PrefetchGate("router").wanted()
    gate = PrefetchGate("auto")
    assert gate.wanted()
    for _ in range(10):
        gate.observe(copied=8, used=1)  # most guesses wasted
    wanted = [gate.wanted() for _ in range(PrefetchGate.PROBE_EVERY * 2)]
    assert wanted.count(True) == 2  # only the probes
    for _ in range(10):
        gate.observe(copied=8, used=8)
    assert gate.wanted()
    always = PrefetchGate("router")
    for _ in range(10):
        always.observe(copied=8, used=0)
    assert always.wanted()


def test_the_next_layers_predicted_experts_are_copied_even_where_this_layer_routed_to_the_same_ids(tmp_path):
    """Every layer's router the same: the next layer's guess (its router on this layer's input) names exactly the
    ids this layer routed to. Those are other units, and must be prefetched (they once were filtered out)."""
    model, _ = _saved("mixtral", tmp_path)
    routers = [layer.mlp.gate.weight for layer in model.model.layers]
    with torch.no_grad():
        for weight in routers[1:]:
            weight.copy_(routers[0])
    directory = str(tmp_path / "same-routers")
    model.save_pretrained(directory)
    config = _config(str(tmp_path), prefetch="router")
    want = _reference(model)
    with tierstore.AutoModel.from_pretrained(directory, budget=_streaming_budget(directory, config),
                                             config=config) as streamed:
        got = streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
        experts = streamed.report().experts
    assert got == want
    assert experts["predicted"] > 0 and experts["prefetch_copied"] > 0, experts


def test_the_trace_has_the_experts_own_tracks(tmp_path):
    """Expert copies and reads go on tracks of their own, one event per expert copied."""
    model, directory = _saved("qwen3_moe", tmp_path)
    config = _config(str(tmp_path))
    budget = _streaming_budget(directory, config)
    trace = str(tmp_path / "run.json")
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, trace=trace) as streamed:
        streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        copied = streamed.report().tiers["experts device"]
        expert_bytes = streamed.plan.experts.expert_bytes
    with open(trace) as handle:
        events = json.load(handle)["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    copies = [e for e in events if e["ph"] == "X" and names[e["tid"]] == "experts host->device copy"]
    assert copies and len(copies) == copied.bytes_in // expert_bytes
    assert all(".experts." in e["args"]["unit"] for e in copies)
    assert any(names[e["tid"]].startswith("experts disk reader") for e in events if e["ph"] == "X")


def test_the_expert_slots_policy_is_chosen_from_the_routing_seen():
    """Replayed through the slots, a hot pair among one-off experts favours lfu; a working set that moves on
    favours lru; a tie keeps the policy in use."""
    from tierstore.policies.experts import best_policy

    hot_among_scans = [key for i in range(200) for key in ("a" if i % 2 else "b", f"scan{i}")]
    best, rates = best_policy(hot_among_scans, slots=3, current="lru")
    assert best == "lfu" and rates["lfu"] > rates["lru"]
    moving = [key for phase in range(20) for _ in range(30) for key in (f"p{phase}a", f"p{phase}b", f"p{phase}c")]
    best, rates = best_policy(moving, slots=3, current="lfu")
    assert best == "lru" and rates["lru"] > rates["lfu"]
    assert best_policy(["x", "y"], slots=2, current="fifo")[0] == "fifo"  # every policy hits nothing: keep


def test_an_auto_policy_is_reported_and_a_configured_one_kept(tmp_path):
    model, directory = _saved("qwen3_moe", tmp_path)
    budget = _streaming_budget(directory, _config(str(tmp_path)))
    for policy, chosen in (("auto", True), ("lru", False)):
        config = _config(str(tmp_path), device_policy=policy)
        with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as streamed:
            streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            notes = streamed.report().notes
            assert any("expert slots' policy for the next call" in note for note in notes) == chosen
            if not chosen:
                assert streamed.experts.store.device.policy.__class__.__name__ == "LRU"


def test_a_store_keeps_the_expert_layout_it_was_written_with(tmp_path):
    """A store converted with experts inside their layers (as before experts were units) still runs, whole layers;
    a store of expert units asked to run whole layers is refused in one line, naming why."""
    from tierstore.inference.loading.convert import convert
    from tierstore.inference.loading.resolve import resolve

    model, directory = _saved("mixtral", tmp_path)
    want = _reference(model)
    whole_store = convert(resolve(directory), str(tmp_path / "whole"), progress=False, split_experts=False)
    split_store = convert(resolve(directory), str(tmp_path / "split"), progress=False)
    with tierstore.AutoModel.from_pretrained(whole_store, config=_config(str(tmp_path))) as layered:
        assert layered.experts is None
        assert layered.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist() == want
    with pytest.raises(tierstore.ConfigError, match="holds each expert as a unit; experts.streaming = false"):
        tierstore.AutoModel.from_pretrained(split_store, config=_config(str(tmp_path), streaming=False))


def test_the_cost_model_gives_the_cpu_the_cheap_cold_misses_while_that_shortens_the_layer():
    from tierstore.policies.experts import ExpertCosts, split_misses

    even = ExpertCosts(link_gbps=10.0, host_gbps=10.0, host_gbps_32=10.0)
    one_token = {expert: 1 for expert in range(8)}
    assert len(split_misses(one_token, 10**7, even)) == 4  # as fast as the link: half each
    # the host's fixed cost per layer call (reading the hidden state back, the sum's trip) keeps small misses copied
    assert split_misses({0: 1, 1: 1}, 10**6, even) == []
    slow_cpu = ExpertCosts(link_gbps=50.0, host_gbps=5.0, host_gbps_32=5.0)
    assert split_misses(one_token, 10**7, slow_cpu) == []  # one host expert takes longer than all the copies
    assert len(split_misses(one_token, 10**7, ExpertCosts(10.0, 30.0, 30.0))) == 6  # a faster CPU takes more
    # the CPU's cost grows with tokens (32 tokens cost 8x one): the busy experts are copied, the cold ones computed
    growing = ExpertCosts(link_gbps=10.0, host_gbps=10.0, host_gbps_32=10.0 / 8)
    mixed = {0: 40, 1: 1, 2: 1, 3: 30}
    assert set(split_misses(mixed, 10**7, growing)) == {1, 2}
    # at equal tokens, the coldest go to the CPU and the hot ones are copied into slots, where they hit again
    heat = {expert: 100 * (expert % 2) for expert in range(8)}
    assert set(split_misses(one_token, 10**7, even, heat)) == {0, 2, 4, 6}
    # a compressed expert the CPU must dequantize first takes that much longer there: dequantizing as long as a
    # copy halves the CPU's pace (2 of 8, not 4); longer than every copy, nothing goes to the CPU
    unpacking = dataclasses.replace(even, host_unpack_s=even.copy_s(10**7))
    assert len(split_misses(one_token, 10**7, unpacking)) == 2
    assert split_misses(one_token, 10**7, dataclasses.replace(even, host_unpack_s=8 * even.copy_s(10**7))) == []
    assert len(split_misses(one_token, 10**7, dataclasses.replace(even, host_unpack_s=5e-4))) == 3  # 4 without
    # measured dequantization: taken as it is the first time, then moved a fifth of the way
    assert even.unpacked(2e-3).host_unpack_s == 2e-3
    assert even.unpacked(2e-3).unpacked(1e-3).host_unpack_s == pytest.approx(1.8e-3)
    # work the costs put at 1 s took 4 s: both CPU rates move a fifth of the way toward a quarter of themselves
    slower = ExpertCosts(10.0, 40.0, 20.0).observed(predicted_s=1.0, seconds=4.0)
    assert (slower.host_gbps, slower.host_gbps_32, slower.link_gbps) == pytest.approx((34.0, 17.0, 10.0))


def test_misses_split_between_copies_and_the_cpu_give_the_same_tokens(tmp_path):
    """auto with the CPU as fast as the link: a layer's misses are divided between the two, in one pass."""
    from tierstore.policies.experts import ExpertCosts

    model, directory = _saved("qwen3_moe", tmp_path)
    want = _reference(model)
    config = _config(str(tmp_path), prefetch="none")
    budget = _streaming_budget(directory, config)
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as streamed:
        streamed.experts.compute = "auto"  # on a CPU the plan's auto is host: force the split
        streamed.experts.costs = ExpertCosts(link_gbps=10.0, host_gbps=10.0, host_gbps_32=10.0, host_call_s=0.0)
        got = streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
        report = streamed.report()
    assert got == want
    assert report.experts["host_computed"] > 0 and report.tiers["experts device"].misses > 0
    assert report.experts["cpu_gbps"] > 0
    # each CPU-computed expert had at least one token of the routed pairs; each call computed at least one
    experts = report.experts
    assert experts["pairs"] >= experts["host_pairs"] >= experts["host_computed"] >= experts["host_calls"] > 0
    assert experts["host_tokens_per_expert"] == experts["host_pairs"] / experts["host_computed"]


def test_the_cpus_experts_leave_cores_to_the_threads_waiting_on_a_gpu(tmp_path, monkeypatch):
    """Beside a GPU the CPU's experts run on all but SPARE_CORES of torch's threads (a thread waiting on the GPU
    spins a core, and a full team of threads stalls on the one sharing it), and torch's count is restored after;
    on a CPU the count is left as it is. The runner's host path is checked with the rule forced on a CPU."""
    from tierstore.inference.runtime import experts as experts_module
    from tierstore.inference.runtime.host_experts import SPARE_CORES, cpu_threads, host_threads

    assert host_threads(torch.device("cuda"), 16) == 16 - SPARE_CORES
    assert host_threads(torch.device("cuda"), 2) == 1
    assert host_threads(torch.device("cpu"), 16) is None
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), cpu_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("restored on the way out")
    assert torch.get_num_threads() == before

    seen = []
    run = experts_module.host_outputs
    monkeypatch.setattr(experts_module, "host_threads", lambda device, threads: 1)
    monkeypatch.setattr(experts_module, "host_outputs",
                        lambda *args, **kwargs: seen.append(torch.get_num_threads()) or run(*args, **kwargs))
    model, directory = _saved("qwen3_moe", tmp_path)
    want = _reference(model)
    config = _config(str(tmp_path), compute="host", prefetch="none")
    with tierstore.AutoModel.from_pretrained(directory, budget=_streaming_budget(directory, config),
                                             config=config) as streamed:
        got = streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
    assert got == want and seen and set(seen) == {1}
    assert torch.get_num_threads() == before


def test_a_budget_holding_every_expert_runs_past_the_kernels_group_limit(tmp_path, monkeypatch):
    """1,600 experts, all in device slots: torch's grouped_mm takes at most 1,024 groups on a GPU, so the slots
    run in windows; every kernel call must stay within the limit and the tokens must be transformers'."""
    from tierstore.inference.runtime.experts import MAX_GROUPS

    model, why = tiny("qwen3_moe", num_experts=400, num_hidden_layers=4, num_experts_per_tok=48)
    assert model is not None, why
    directory = str(tmp_path / "wide")
    model.save_pretrained(directory)
    prompt = torch.randint(3, model.config.vocab_size, (1, 160), generator=torch.Generator().manual_seed(0))
    want = _reference(model, prompt=prompt)  # a prompt routed to more than 1,024 of them (about 1,050)
    groups = []
    real = torch.nn.functional.grouped_mm

    def counted(inputs, weight, *args, **kwargs):
        groups.append(weight.shape[0])
        return real(inputs, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", counted)
    config = _config(str(tmp_path))
    with tierstore.AutoModel.from_pretrained(directory, budget={"vram": "1GB", "ram": "1GB"}, config=config) as whole:
        assert whole.plan.experts.device_slots == 1600 > MAX_GROUPS
        got = whole.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
    assert got == want
    assert groups and max(groups) <= MAX_GROUPS
    assert 1600 - MAX_GROUPS in groups  # the second window ran


def test_experts_read_in_place_follow_the_routing_into_slots_and_every_row_leads_to_its_expert(tmp_path):
    """`experts.compute = mapped` on a tiny Mixtral, a third of the experts in device slots, every one in RAM, a
    longer decode: transformers' tokens; experts routed to again are copied into slots as it runs, and afterwards
    every expert's row of the table leads to that expert's own bytes (in its slot or in host RAM)."""
    model, directory = _saved("mixtral", tmp_path)
    want = _reference(model, new_tokens=24)
    config = _config(str(tmp_path), compute="mapped", prefetch="none")
    budget = _streaming_budget(directory, config, every_expert_in_ram=True)
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as streamed:
        got = streamed.generate(PROMPT, max_new_tokens=24, do_sample=False, pad_token_id=0).tolist()
        report = streamed.report()
        runner = streamed.experts
        keys = [key for group in runner.groups for key in group.keys]
        in_ram = runner.store.get_host_many(keys, count=False)
        try:
            wrong = [key for key, tensors in zip(keys, in_ram)
                     if not torch.equal(runner._mapped.bytes_read(key),
                                        torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors.values()]))]
        finally:
            runner.store.release_host_many(keys)
    assert got == want
    experts = report.experts
    assert experts["mapped_pairs"] > 0 and experts["mapped_admitted"] > 0, experts
    assert 0 < experts["mapped_slot_share"] < 1, experts
    assert not wrong, wrong


def test_each_replayed_steps_routing_reaches_the_host_once_in_order_without_a_wait(tmp_path):
    """A captured step logs its routing on the device; before each later replay the log of the one before is sent
    to the host behind it and read when it has arrived (a decode loop running a step ahead must not wait for the
    last replay): each replay's routing is given once, in order, counted against the slots it read from, and a
    call's last replay's by `replays_done`. Replays are simulated here (a CPU runs no graphs): each writes the log."""
    _, directory = _saved("mixtral", tmp_path)
    config = _config(str(tmp_path), compute="mapped", prefetch="none")
    budget = _streaming_budget(directory, config, every_expert_in_ram=True)
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as streamed:
        streamed.generate(PROMPT, max_new_tokens=2, do_sample=False, pad_token_id=0)
        engine = streamed.experts._engine()
        layers, top_k = len(engine.groups), engine.groups[0].top_k
        engine._log_pairs = top_k  # a one-token step's pairs
        replays = [torch.randint(0, engine.groups[0].num_experts, (layers, top_k), generator=torch.Generator()
                                 .manual_seed(seed)) for seed in range(3)]
        given = engine.replaying()  # before the first replay: nothing logged yet
        assert given == []
        slots = []
        for turn, logged in enumerate(replays):
            engine._log[:, :top_k] = logged  # the replay
            slots.append(tuple(engine._in_slots))
            given += engine.replaying() if turn < len(replays) - 1 else engine.replays_done()
            engine._in_slots = [frozenset(range(turn + layer)) for layer in range(layers)]  # the slots follow
        assert engine.replays_done() == []  # nothing twice
    assert [call.routed for call in given] == [row.tolist() for logged in replays for row in logged]
    assert [call.from_slots for call in given] == [sum(expert in read[layer] for expert in row.tolist())
                                                   for logged, read in zip(replays, slots)
                                                   for layer, row in enumerate(logged)]


def test_reading_experts_in_place_needs_every_expert_in_ram(tmp_path):
    """`experts.compute = mapped` with a RAM budget for half the experts is refused in one line naming the fix."""
    _, directory = _saved("mixtral", tmp_path)
    budget = _streaming_budget(directory, _config(str(tmp_path)))
    config = _config(str(tmp_path), compute="mapped")
    with pytest.raises(tierstore.BudgetError, match="mapped reads routed experts from host RAM, which must hold"):
        make_plan_for(directory, budget, config)


def test_experts_read_in_place_under_a_draft_and_in_the_batcher_give_the_plain_tokens(tmp_path):
    """`experts.compute = mapped` beside calls that copy experts: an n-gram draft's verify passes (wide ones
    copy, narrow ones read in place) give transformers' greedy tokens, and the batcher's rows, decoded together,
    get the tokens each gets alone."""
    import threading
    import types

    from tierstore.inference.front.batcher import Batcher, SamplingParams

    model, directory = _saved("mixtral", tmp_path)
    prompts = [[5, 9, 33, 7, 81, 5, 9, 33], [12, 40, 7], [3, 3, 90, 14, 61]]
    want = [model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0].tolist()
            for ids in prompts]
    config = _config(str(tmp_path), compute="mapped")
    budget = _streaming_budget(directory, config, every_expert_in_ram=True)
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config, draft="ngram") as drafted:
        got = [drafted.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0].tolist()
               for ids in prompts]
        assert drafted.report().experts["mapped_pairs"] > 0
    assert got == want
    with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as streamed:
        # the tiny model has no tokenizer: the batcher needs its pad and end ids, and text for its events
        streamed.tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=None, decode=lambda ids, **_: "")
        batcher = Batcher(streamed, max_batch=4, max_queue=4, max_seq_tokens=64)
        done = [threading.Event() for _ in prompts]
        sequences = [batcher.submit(ids, SamplingParams(max_tokens=16, temperature=0),
                                    lambda event, i=i: done[i].set() if event.finish_reason else None)
                     for i, ids in enumerate(prompts)]
        assert all(event.wait(120) for event in done)
        batcher.close()
        assert streamed.experts.stats.mapped_pairs > 0
    assert [ids + s.tokens for ids, s in zip(prompts, sequences)] == [row[:len(ids) + len(s.tokens)]
                                                                      for ids, row, s in zip(prompts, want, sequences)]
    assert all(len(s.tokens) == 16 for s in sequences)
