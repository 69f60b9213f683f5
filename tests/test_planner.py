import pytest
from tierstore.policies import PlanInput, UnitInfo, make_plan

from tierstore import BudgetError

MB = 10**6


def _units(n_layers=10, layer=100 * MB, embed=50 * MB):
    units = [UnitInfo("embed", embed, 2)] + [UnitInfo(f"layers.{i}", layer) for i in range(n_layers)] + \
            [UnitInfo("norm", 1 * MB)]
    schedule = ("embed", *[f"layers.{i}" for i in range(n_layers)], "norm", "embed")
    return tuple(units), schedule


def _plan(device, host, **kw):
    units, schedule = _units()
    return make_plan(PlanInput(units=units, schedule=schedule, device_budget_bytes=device,
                               host_budget_bytes=host, **kw))


def test_everything_fits_on_the_device():
    plan = _plan(2000 * MB, 500 * MB)
    assert plan.regime == "device" and plan.h2d_bytes_per_pass == 0 and plan.disk_bytes_per_pass == 0


def test_device_plus_host():
    plan = _plan(500 * MB, 2000 * MB, h2d_gbps=50.0)
    assert plan.regime == "device+host"
    assert "embed" in plan.device_resident  # used twice per pass
    assert plan.disk_bytes_per_pass == 0
    streamed = len(plan.streamed_from_host)
    assert plan.h2d_bytes_per_pass == streamed * 100 * MB
    assert plan.predicted["bound"] == "h2d"
    assert plan.predicted["step_s"] == pytest.approx(plan.h2d_bytes_per_pass / 50e9)
    assert plan.device_weights_bytes >= sum(100 * MB for k in plan.device_resident if k.startswith("layers")) \
        + plan.device_slot_bytes


def test_needs_disk():
    plan = _plan(500 * MB, 500 * MB, h2d_gbps=50.0, disk_gbps=2.0)
    assert plan.regime == "disk" and plan.streamed_from_disk
    assert plan.predicted["bound"] == "disk"
    total = 10 * 100 * MB + 50 * MB + 1 * MB
    # what is read from disk each pass is what fits in neither tier, nothing more
    assert plan.disk_bytes_per_pass <= total - 500 * MB + plan.device_slot_bytes + plan.host_slot_bytes


def test_reserve_and_too_small_budgets_say_what_is_needed():
    with pytest.raises(BudgetError, match="layers.0.*100000000 bytes"):
        _plan(90 * MB, 1000 * MB)
    with pytest.raises(BudgetError, match="no room for weights"):
        _plan(100 * MB, 1000 * MB, device_reserve_bytes=100 * MB)


def test_overrides_win():
    plan = _plan(500 * MB, 2000 * MB, device_policy="lru", host_policy="fifo", prefetch="none")
    assert (plan.device_policy, plan.host_policy, plan.prefetch, plan.prefetch_depth) == ("lru", "fifo", "none", 0)
    plan = _plan(500 * MB, 2000 * MB, prefetch_depth=1)
    assert plan.prefetch_depth == 1


def test_plan_is_data():
    import json

    data = _plan(500 * MB, 500 * MB).to_dict()
    assert json.loads(json.dumps(data))["regime"] == "disk"


def test_resident_layers_are_spread_so_copies_overlap_compute():
    """Half the layers resident: the streamed ones alternate with them instead of forming one block, so each copy
    runs while a resident layer computes."""
    plan = _plan(100 * MB * 6 + 51 * MB + 3 * 100 * MB, 2000 * MB)
    layers = [f"layers.{i}" for i in range(10)]
    resident = [key in plan.device_resident for key in layers]
    assert 4 <= sum(resident) <= 7, plan.device_resident
    longest_streamed_run = max(len(run) for run in "".join("s" if not r else "r" for r in resident).split("r"))
    assert longest_streamed_run <= 2, resident


def test_the_device_memorys_rate_bounds_a_resident_pass_and_a_packed_unit_counts_its_dequantized_copy():
    """With the device memory's rate measured (`hbm_gbps`), a resident pass is bound by the bytes it reads there
    (each use of a unit; a packed unit's `read_bytes`: read packed, its dequantized copy written and read), and a
    streamed pass by the slower of that and the link."""
    units, schedule = _units()
    resident = make_plan(PlanInput(units=units, schedule=schedule, device_budget_bytes=2000 * MB,
                                   host_budget_bytes=500 * MB, hbm_gbps=2000.0))
    read = 50 * MB * 2 + 10 * 100 * MB + 1 * MB
    assert resident.regime == "device" and resident.predicted["bound"] == "hbm"
    assert resident.predicted["step_s"] == pytest.approx(read / 2000e9)
    packed = tuple(UnitInfo(u.key, u.nbytes, u.uses_per_pass, u.nbytes + 2 * 400 * MB) if u.key.startswith("layers")
                   else u for u in units)
    dequantized = make_plan(PlanInput(units=packed, schedule=schedule, device_budget_bytes=2000 * MB,
                                      host_budget_bytes=500 * MB, hbm_gbps=2000.0))
    assert dequantized.predicted["step_s"] == pytest.approx((read + 10 * 800 * MB) / 2000e9)
    streamed = _plan(500 * MB, 2000 * MB, h2d_gbps=50.0, hbm_gbps=2000.0)
    assert streamed.predicted["bound"] == "h2d" and streamed.predicted["hbm_s"] == pytest.approx(read / 2000e9)


@pytest.mark.parametrize("kw, words", [
    ({"device": 500 * MB, "host": 2000 * MB}, "not measured"),  # streams, but no probe: no 0.0 and no bound
    ({"device": 500 * MB, "host": 500 * MB, "h2d_gbps": 50.0}, "not measured"),  # the disk's rate unknown
    ({"device": 2000 * MB, "host": 500 * MB, "h2d_gbps": 50.0, "disk_gbps": 2.0}, "bound by compute"),
    ({"device": 500 * MB, "host": 2000 * MB, "h2d_gbps": 50.0, "unpredictable": "on a CPU ..."}, "on a CPU"),
])
def test_an_unknown_prediction_says_why_instead_of_a_number(kw, words):
    plan = _plan(kw.pop("device"), kw.pop("host"), **kw)
    assert plan.predicted["step_s"] is None and plan.predicted["bound"] is None
    assert words in plan.predicted["unknown"]


def test_a_bad_policy_name_is_a_config_error():
    from tierstore import ConfigError

    with pytest.raises(ConfigError, match="device_policy: unknown policy 'random'"):
        _plan(500 * MB, 2000 * MB, device_policy="random")


@pytest.mark.parametrize("compute, reserved", [("mapped", True), ("auto", True), ("device", False), ("host", False)])
def test_a_moe_plan_reserves_the_in_place_gather_where_experts_may_be_read_in_place(compute, reserved):
    """A layer reading its experts in place gathers a few of them into one buffer (inference/runtime/
    mapped_experts.py): on a device with an activation reserve that buffer is reserved too, out of the slots."""
    from tierstore.policies.experts import ExpertCosts, ExpertsInput, gather_pairs

    assert gather_pairs(4) == 8 and gather_pairs(1) == 8 and gather_pairs(16) == 16 and gather_pairs(3) == 6
    units, schedule = _units()

    def plan(compute, reserve):
        experts = ExpertsInput(layers=10, experts_per_layer=64, top_k=4, expert_bytes=10 * MB, compute=compute,
                               costs=ExpertCosts(link_gbps=50.0, host_gbps=40.0, host_gbps_32=40.0))
        return make_plan(PlanInput(units=units, schedule=schedule, device_budget_bytes=2000 * MB,
                                   host_budget_bytes=20_000 * MB, device_reserve_bytes=reserve, experts=experts))
    gather = 8 * 10 * MB if reserved else 0
    on_gpu = plan(compute, 300 * MB)
    assert on_gpu.device_reserve_bytes == 300 * MB + gather
    assert on_gpu.experts.device_slots == plan("device", 300 * MB + gather).experts.device_slots
    assert plan(compute, 0).device_reserve_bytes == 0  # a CPU: activations live in RAM
    if reserved:
        assert on_gpu.experts.device_slots < plan("device", 300 * MB).experts.device_slots


@pytest.mark.parametrize("mappable", [True, False])
def test_compressed_experts_are_read_in_place_under_auto_only_when_stored_alike(mappable):
    """Packed experts all in one format are read in place under auto (dequantized on the device, measured faster
    than filling the window from slots); experts in several formats, or rotated, never are: no gather reserved."""
    from tierstore.policies.experts import ExpertCosts, ExpertsInput

    units, schedule = _units()
    experts = ExpertsInput(layers=10, experts_per_layer=64, top_k=4, expert_bytes=3 * MB, window=32,
                           window_bytes=320 * MB, mappable=mappable,
                           costs=ExpertCosts(link_gbps=50.0, host_gbps=40.0, host_gbps_32=40.0))
    plan = make_plan(PlanInput(units=units, schedule=schedule, device_budget_bytes=2000 * MB,
                               host_budget_bytes=20_000 * MB, device_reserve_bytes=300 * MB, experts=experts))
    assert plan.device_reserve_bytes == 300 * MB + 320 * MB + (8 * 3 * MB if mappable else 0)
    assert any("reads each routed expert in place" in note for note in plan.notes) == mappable
    assert any("dequantized on the device, 32 at a time" in note for note in plan.notes)


@pytest.mark.parametrize("compress", ["none", "q8_0"])
def test_a_packed_unit_reads_its_bytes_and_twice_its_dequantized_copy_and_a_looked_up_embedding_none(
        compress, tiny_dirs, tmp_path):
    """What the planner is told a pass reads from device memory: a packed unit its stored bytes plus its
    dequantized copy written and read (compute dtype), an untied input embedding nothing (a row a token), any
    other unit its bytes."""
    import torch

    from tierstore import Config
    from tierstore.inference.loading.resolve import resolve
    from tierstore.inference.loading.sources import open_units
    from tierstore.inference.placement.plan import device_reads
    from tierstore.inference.runtime.lookup import lookup_key

    directory, reference = tiny_dirs("llama", tie=False)
    cfg = Config.load({"runtime": {"cache_dir": str(tmp_path / "cache"), "device": "cpu"},
                       "compression": {"format": compress}})
    units = open_units(resolve(directory, False), cfg, torch.device("cpu"), torch.float32, False, progress=False)
    embedding = lookup_key(units.skeleton)
    reads = device_reads(units, torch.device("cpu"))
    assert embedding == "embed_tokens" and reads[embedding] == 0
    layer = units.layouts["layers.0"].nbytes
    numel = sum(p.numel() for p in reference.model.layers[0].parameters() if p.dim() == 2)
    if compress == "none":
        assert set(reads) == {embedding}
    else:
        assert layer < numel * 4  # stored packed
        assert reads["layers.0"] == layer + 2 * numel * 4


def test_a_k_quant_unit_multiplied_in_its_blocks_reads_its_stored_bytes_only(tmp_path, monkeypatch):
    """Where decode steps multiply a unit's k-quant matrices in their blocks (a GPU; here the CPU stands in for
    one), the planner is told a pass reads the unit's stored bytes, no dequantized copy; elsewhere the copy too."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tierstore import Config
    from tierstore.compression import Decompressor
    from tierstore.inference.loading.resolve import resolve
    from tierstore.inference.loading.sources import open_units
    from tierstore.inference.placement.plan import device_reads

    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    cfg = Config.load({"runtime": {"cache_dir": str(tmp_path / "cache"), "device": "cpu"},
                       "compression": {"format": "q4_k_m"}})
    units = open_units(resolve(str(tmp_path / "model"), False), cfg, torch.device("cpu"), torch.float32, False,
                       progress=False)
    layer, numel = units.layouts["layers.0"].nbytes, units.dense_packed["layers.0"].numel
    assert device_reads(units, torch.device("cpu"))["layers.0"] == layer + 2 * numel * 4
    monkeypatch.setattr(Decompressor, "MATVEC_DEVICES", ("cpu",))
    assert device_reads(units, torch.device("cpu"))["layers.0"] == layer
