"""Tensor parallelism on the CPU: gloo ranks (started by torchrun, or by `tierstore generate --tp N`) give the
tokens and logits of one process, for SmolLM2 and tiny models of several architectures; ranks fail together with
one line; bad N is refused before any rank starts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROMPT = [5, 9, 33, 7, 81, 100, 3]
RANK_SCRIPT = os.path.join(os.path.dirname(__file__), "tp_rank.py")


def _torchrun(ranks: int, model_dir: str, tmp_path, prompt=PROMPT, new_tokens: int = 8) -> dict:
    """The rank script under torchrun; rank 0's tokens and logits."""
    out = tmp_path / f"tp{ranks}.pt"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                          "--standalone", RANK_SCRIPT, model_dir, str(out), json.dumps(prompt),
                          str(new_tokens), str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HOME": str(tmp_path),
                                                                           "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral", "gemma", "glm4", "phi3"])
def test_two_ranks_match_transformers(model_type, tiny_dirs, tmp_path):
    directory, reference = tiny_dirs(model_type)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want_tokens = reference.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        want_logits = reference(ids).logits
    got = _torchrun(2, directory, tmp_path)
    assert got["tokens"].tolist() == want_tokens.tolist()
    assert torch.allclose(got["logits"], want_logits, atol=1e-4, rtol=0), \
        (got["logits"] - want_logits).abs().max()


@pytest.mark.slow
def test_smollm2_three_ranks_give_one_process_tokens_and_logits(smollm2_store, tmp_path):
    """SmolLM2-135M has 9 attention heads and 3 key-value heads: 3 ranks (2 do not divide them)."""
    store, _ = smollm2_store
    import tierstore

    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]
    with tierstore.AutoModel.from_pretrained(store, config={"runtime": {"cache_dir": str(tmp_path)}}) as one:
        ids = torch.tensor([prompt])
        want_tokens = one.generate(ids, max_new_tokens=12, do_sample=False)
        want_logits = one(ids).logits
    got = _torchrun(3, store, tmp_path, prompt, 12)
    assert got["tokens"].tolist() == want_tokens.tolist()
    assert (got["logits"] - want_logits).abs().max() < 1e-4


def _cli(tmp_path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "tierstore", "generate", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
                                            **(env or {})})


@pytest.mark.slow
def test_generate_tp_prints_the_single_process_answer(smollm2_store, tmp_path):
    store, _ = smollm2_store
    one = _cli(tmp_path, store, "--prompt", "What is the capital of France?", "--report-json",
               str(tmp_path / "one.json"))
    three = _cli(tmp_path, store, "--prompt", "What is the capital of France?", "--tp", "3", "--report-json",
                 str(tmp_path / "three.json"))
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-3000:]
    assert json.loads((tmp_path / "three.json").read_text())["tokens"] == \
        json.loads((tmp_path / "one.json").read_text())["tokens"]
    assert three.stdout.startswith("The capital of France is Paris.")
    assert three.stdout.count("tierstore tiers") == 1  # rank 0 speaks; the others are quiet
    assert "rank 0 of 3" in three.stdout


@pytest.mark.slow
def test_each_rank_writes_its_shards_once_and_a_corrupt_shard_ends_the_run(smollm2_store, tmp_path):
    """The first `--tp 3` run writes each rank's shards as a layer store of their own (a third of each decoder
    layer, with its own checksums); a second run reads them, and a corrupt shard is refused before its bytes
    reach the model: every rank ends, with one line naming the file."""
    import glob

    store, _ = smollm2_store
    first = _cli(tmp_path, store, "--prompt", "hi", "--tp", "3", "--max-new-tokens", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    whole = json.loads((Path(store) / "manifest.json").read_text())["units"]["layers.3"]
    shards = []
    for rank in range(3):
        (directory,) = glob.glob(str(tmp_path / ".cache" / "tierstore" / f"*-tp3-rank{rank}-*"))
        shards.append(json.loads((Path(directory) / "manifest.json").read_text())["units"]["layers.3"])
        assert 0.3 < shards[-1]["nbytes"] / whole["nbytes"] < 0.37, (rank, shards[-1]["nbytes"], whole["nbytes"])
    assert len({shard["checksum"] for shard in shards}) == 3  # three different thirds, each with its checksum
    (directory,) = glob.glob(str(tmp_path / ".cache" / "tierstore" / "*-tp3-rank1-*"))
    unit = Path(directory) / shards[1]["file"]
    data = bytearray(unit.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unit.write_bytes(bytes(data))
    second = _cli(tmp_path, store, "--prompt", "hi", "--tp", "3", "--max-new-tokens", "4")
    assert second.returncode == 2, second.stderr[-3000:]  # a checkpoint error, as with one process
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith("tierstore: error: rank 1 of 3: ") and f"{unit}: checksum mismatch" in line, line


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank_with_one_line(smollm2_store, tmp_path):
    """Rank 1 fails on its fifth unit read; ranks 0 and 2, waiting in a collective, are stopped too."""
    directory, _ = smollm2_store
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from tierstore.store import TieredStore\n"
        "    real, calls = TieredStore.get, [0]\n"
        "    def failing(self, *a, **k):\n"
        "        calls[0] += 1\n"
        "        if calls[0] == 5:\n"
        "            raise RuntimeError('injected failure on rank 1')\n"
        "        return real(self, *a, **k)\n"
        "    TieredStore.get = failing\n")
    run = _cli(tmp_path, directory, "--prompt", "hi", "--tp", "3", "--max-new-tokens", "4",
               env={"PYTHONPATH": f"{inject}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr.strip().splitlines() == [
        "tierstore: error: rank 1 of 3: internal error: RuntimeError: injected failure on rank 1 (set "
        "TIERSTORE_DEBUG=1 for the traceback)"], run.stderr[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--tp", "2"], "--tp 2 does not divide the model's 9 attention heads; use a divisor of 9"),
    (["--tp", "0"], "--tp must be at least 1, got 0"),
    (["--tp", "3", "--draft", "ngram"], "--tp runs one prompt or a batch of --prompt; --draft does not combine "
                                        "with it yet"),
])
@pytest.mark.slow
def test_bad_tp_is_refused_in_one_line_before_any_rank_starts(args, message, smollm2_store, tmp_path):
    store, _ = smollm2_store
    run = _cli(tmp_path, store, "--prompt", "hi", *args)
    assert run.returncode == 2 and run.stderr.splitlines() == [f"tierstore: error: {message}"], run.stderr


def test_a_ranks_units_are_its_shard_and_the_plan_says_so(tiny_dirs, tmp_path):
    """At N = 2 each decoder layer and the vocabulary units are about half (the norms stay whole on every rank),
    and `tierstore plan --tp 2` is a rank's plan."""
    from tierstore.config import Config
    from tierstore.inference.compose import make_plan_for
    from tierstore.inference.loading.resolve import resolve
    from tierstore.inference.loading.sources import open_units
    from tierstore.inference.loading.shards import Group, shard_units

    directory, _ = tiny_dirs("llama")
    config = {"runtime": {"cache_dir": str(tmp_path)}}
    units = open_units(resolve(directory), Config.load(config), torch.device("cpu"), None, False, False)
    try:
        sharded, _ = shard_units(units, Group(1, 2))
        for key in ("layers.0", "embed_tokens", "lm_head"):
            assert 0.45 < sharded.layouts[key].nbytes / units.layouts[key].nbytes < 0.55, key
        assert sharded.layouts["norm"] == units.layouts["norm"]
    finally:
        units.close()
    plan = make_plan_for(directory, {"vram": "1GB", "ram": "1GB"}, config, tensor_parallel=2)
    assert any("rank 0 of 2" in note for note in plan.notes)


def test_a_ranks_shard_store_holds_its_slices_and_one_sharded_another_way_is_refused(tiny_dirs, tmp_path):
    """`rank_store` writes the rank's slices of every unit as they were served from the whole units, and reads
    them back from there; a store whose manifest says another shape for a unit is refused, naming it."""
    from tierstore.config import Config
    from tierstore.errors import CheckpointError
    from tierstore.inference.loading.resolve import resolve
    from tierstore.inference.loading.sources import open_units
    from tierstore.inference.loading.shards import Group, rank_store, shard_units

    directory, _ = tiny_dirs("llama")
    cfg = Config.load({"runtime": {"cache_dir": str(tmp_path)}})

    def opened():
        units = open_units(resolve(directory), cfg, torch.device("cpu"), None, False, False)
        return shard_units(units, Group(1, 2))[0]

    sharded = opened()
    want = {}
    for key, layout in sharded.layouts.items():
        want[key] = torch.zeros(layout.nbytes, dtype=torch.uint8)
        sharded.source.read_into(key, want[key])
    stored = rank_store(sharded, Group(1, 2), cfg, torch.device("cpu"), False)
    try:
        for key, layout in stored.layouts.items():
            got = torch.zeros(layout.nbytes, dtype=torch.uint8)
            stored.source.read_into(key, got)
            assert torch.equal(got, want[key]), key
    finally:
        stored.close()
    (manifest,) = tmp_path.glob("*-tp2-rank1-*/manifest.json")
    data = json.loads(manifest.read_text())
    tensors = data["units"]["layers.0"]["tensors"]
    name = next(iter(tensors))
    tensors[name]["shape"][0] //= 2
    manifest.write_text(json.dumps(data))
    sharded = opened()
    with pytest.raises(CheckpointError, match=r"unit 'layers.0' was sharded another way"):
        try:
            rank_store(sharded, Group(1, 2), cfg, torch.device("cpu"), False)
        finally:
            sharded.close()
