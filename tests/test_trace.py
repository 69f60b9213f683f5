"""The timeline trace (Chrome trace-event JSON) of a real SmolLM2 run, and `tierstore plot` drawing it."""
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

import tierstore
from tierstore.inference.front.cli import main
from tierstore.trace import COMPUTE, COPY, DISK_PREFIX, PASSES, STALLS, TOKENS

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def traced_run(smollm2_store, tmp_path_factory):
    """A streamed SmolLM2 run (most units read from disk each pass) with a trace: (trace dict, sites per pass)."""
    store_dir, _ = smollm2_store
    path = str(tmp_path_factory.mktemp("trace") / "run.json")
    with tierstore.AutoModel.from_pretrained(store_dir, budget=tierstore.Budget(vram="120MB", ram="150MB"),
                                             trace=path) as model:
        ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
        model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        sites = len(model.plan.schedule)
        disk_hits = model.report().tiers["disk"].hits
    with open(path, encoding="utf-8") as handle:
        return json.load(handle), sites, disk_hits, path


def _track(trace, name):
    tids = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"
            and e["args"]["name"] == name}
    return [e for e in trace["traceEvents"] if e["ph"] != "M" and e["tid"] in tids]


def test_every_event_is_well_formed(traced_run):
    trace, *_ = traced_run
    assert trace["traceEvents"]
    for event in trace["traceEvents"]:
        assert {"ph", "ts", "pid", "tid"} <= event.keys(), event
        if event["ph"] == "X":
            assert event["dur"] >= 0, event


def test_one_compute_event_per_unit_and_pass(traced_run):
    trace, sites, _, _ = traced_run
    passes = _track(trace, PASSES)
    assert len(passes) == NEW_TOKENS  # transformers' generate: one forward per new token
    assert len(_track(trace, COMPUTE)) == sites * len(passes)
    assert len([e for e in _track(trace, TOKENS) if e["ph"] == "i"]) == NEW_TOKENS


def test_reads_and_copies_name_unit_bytes_and_tier(traced_run):
    trace, _, disk_hits, _ = traced_run
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    readers = [name for name in names if name.startswith(DISK_PREFIX)]
    reads = [e for name in readers for e in _track(trace, name)]
    assert len(reads) >= disk_hits > 0  # every unit the disk served was read (read-ahead may read a few more)
    for event in reads + _track(trace, COPY):
        assert event["args"]["bytes"] > 0 and event["args"]["unit"] and event["args"]["tier"] in ("disk", "host")
    assert {e["args"]["cause"] for e in _track(trace, STALLS)} <= {"copy", "disk read", "host"}


def test_no_event_overlaps_the_one_before_on_its_track(traced_run):
    trace, *_ = traced_run
    by_track = {}
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            by_track.setdefault(event["tid"], []).append(event)
    assert len(by_track) >= 5  # compute, copy, passes, stalls, waits and disk readers
    for events in by_track.values():
        events.sort(key=lambda e: e["ts"])
        for before, after in zip(events, events[1:]):
            assert after["ts"] >= before["ts"] + before["dur"] - 0.01, (before, after)


def test_plot_writes_a_png(traced_run, tmp_path, capsys):
    *_, path = traced_run
    out = tmp_path / "timeline.png"
    assert main(["plot", path, "-o", str(out)]) == 0
    assert f"pass {NEW_TOKENS // 2} of {NEW_TOKENS}" in capsys.readouterr().out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 300 and len(data) > 20_000


def test_unwritable_trace_is_refused_before_the_run(smollm2_store, tmp_path):
    """One line, exit 2, and nothing converted: the GGUF would have been converted into the cache first."""
    _, gguf = smollm2_store
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-m", "tierstore", "generate", gguf, "--prompt", "hi",
                             "--trace", str(blocker / "run.json")],
                            capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "trace file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / ".cache").exists()


def test_store_without_a_callback_records_nothing(tiny_dirs, tmp_path):
    directory, _ = tiny_dirs("llama")
    with tierstore.AutoModel.from_pretrained(directory, budget=tierstore.Budget(vram="400KB", ram="1MB"),
                                             config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        assert model.tracer is None and model.store.on_event is None
        model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, do_sample=False)
    assert not any(name.endswith(".json") for name in os.listdir(tmp_path))


def test_speculation_traces_draft_steps(smollm2_store, tmp_path):
    """runtime.trace in the config; each verify pass has its draft step before it and a marker after it."""
    store_dir, _ = smollm2_store
    path = str(tmp_path / "spec.json")
    with tierstore.AutoModel.from_pretrained(store_dir, draft="ngram", config={"runtime": {"trace": path}}) as model:
        ids = model.tokenizer("one two three one two three one two", return_tensors="pt").input_ids
        model.generate(ids, max_new_tokens=8, do_sample=False)
        verify_passes = model.report().speculation["passes"]
    with open(path, encoding="utf-8") as handle:
        trace = json.load(handle)
    assert len(_track(trace, "draft")) == verify_passes >= 1
    assert len(_track(trace, PASSES)) == verify_passes + 1  # and the prefill
    assert len([e for e in _track(trace, TOKENS) if e["ph"] == "i"]) == verify_passes + 1


def test_a_muted_tracer_records_nothing():
    """Inside `muted` (a CUDA graph being captured) stamps are None and spans are dropped; after it, recorded."""
    from tierstore.trace import COMPUTE, Tracer

    tracer = Tracer("unused.json", torch.device("cpu"))
    with tracer.muted():
        assert tracer.stamp() is None
        tracer.span(COMPUTE, "unit", None, None)
    start = tracer.stamp()
    tracer.span(COMPUTE, "unit", start, tracer.stamp())
    assert len(tracer._pending) == 1
