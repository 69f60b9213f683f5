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


def _torchrun(ranks: int, model_dir: str, tmp_path, prompt=PROMPT, new_tokens: int = 8, sections=None) -> dict:
    """The rank script under torchrun (with config `sections` beside the cache directory); rank 0's tokens and
    logits."""
    out = tmp_path / f"tp{ranks}.pt"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                          "--standalone", RANK_SCRIPT, model_dir, str(out), json.dumps(prompt),
                          str(new_tokens), str(tmp_path / "cache"), json.dumps(sections or {})],
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


def _one_process(model_dir: str, tmp_path, prompt, new_tokens: int, sections) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the prompt's logits of one process, with config `sections`."""
    import tierstore

    config = {**sections, "runtime": {"cache_dir": str(tmp_path / "one")}}
    with tierstore.AutoModel.from_pretrained(model_dir, config=config) as one:
        ids = torch.tensor([prompt])
        return one.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0), one(ids).logits


@pytest.mark.slow
def test_three_ranks_over_nf4_smollm2_give_the_one_process_nf4_tokens(smollm2_store, tmp_path):
    """Each rank quantizes its own third of every matrix; SmolLM2's cuts fall on nf4's 64-element blocks, so the
    ranks hold the one-process nf4 model's weights and give its tokens (logits within float32 summation order)."""
    store, _ = smollm2_store
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]
    sections = {"compression": {"format": "nf4"}}
    want_tokens, want_logits = _one_process(store, tmp_path, prompt, 12, sections)
    got = _torchrun(3, store, tmp_path, prompt, 12, sections)
    assert got["tokens"].tolist() == want_tokens.tolist()
    assert (got["logits"] - want_logits).abs().max() < 1e-3
    for rank in range(3):  # each rank wrote only its own shards, compressed
        (manifest,) = (tmp_path / "cache").glob(f"*-tp3-rank{rank}-nf4-64*/manifest.json")
        assert json.loads(manifest.read_text())["compression"]["format"] == "nf4"
    assert not list((tmp_path / "cache").glob("*-nf4-64")), "a rank wrote the whole compressed model"


@pytest.fixture(scope="module")
def block_aligned_llama(tmp_path_factory):
    """A llama whose halves are whole blocks of every format here (hidden 512, MLP 1024: 256-element rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         tie_word_embeddings=False)).eval()
    directory = tmp_path_factory.mktemp("aligned-llama")
    model.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("sections", [{"compression": {"format": "int8"}},
                                      {"compression": {"format": "q4_k"}},
                                      {"compression": {"format": "nf4", "blocksize": 128}}], ids=str)
def test_two_ranks_over_a_compressed_model_give_the_one_process_tokens(sections, block_aligned_llama, tmp_path):
    want_tokens, want_logits = _one_process(block_aligned_llama, tmp_path, PROMPT, 8, sections)
    got = _torchrun(2, block_aligned_llama, tmp_path, PROMPT, 8, sections)
    assert got["tokens"].tolist() == want_tokens.tolist()
    assert (got["logits"] - want_logits).abs().max() < 1e-4


def test_ranks_of_a_bare_config_read_shard_stores_written_by_write_store(block_aligned_llama, tmp_path):
    """A model known only by its config.json runs under tensor parallelism from shard stores each rank's
    `write_store(..., shard=)` wrote beforehand (how a benchmark writes a 405B model no disk here holds whole): the
    ranks give the one-process compressed tokens; a missing rank store is refused in one line."""
    from safetensors.torch import load_file
    from tierstore.inference.loading.resolve import resolve
    from tierstore.inference.loading.shards import rank_store_dir
    from tierstore.inference.loading.splits import Group
    from tierstore.inference.loading.store_writer import write_store
    from transformers import AutoConfig

    from tierstore.compression import Codec
    from tierstore.config import Config

    sections = {"compression": {"format": "nf4", "blocksize": 128}}
    want_tokens, want_logits = _one_process(block_aligned_llama, tmp_path, PROMPT, 8, sections)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(Path(block_aligned_llama, "config.json").read_text())
    weights = load_file(str(Path(block_aligned_llama, "model.safetensors")))
    cfg = Config.load({**sections, "runtime": {"cache_dir": str(tmp_path / "cache")}})
    config = AutoConfig.from_pretrained(bare)
    checkpoint = resolve(str(bare), weights=False)
    for rank in range(2):
        write_store(rank_store_dir(checkpoint, cfg, torch.float32, Group(rank, 2)), config,
                    lambda key, names: {name: weights[name] for name in names}, torch.float32,
                    codec=Codec.create("nf4", 128), shard=Group(rank, 2), progress=False)
    got = _torchrun(2, str(bare), tmp_path, PROMPT, 8, sections)
    assert got["tokens"].tolist() == want_tokens.tolist()
    assert (got["logits"] - want_logits).abs().max() < 1e-4
    # the CLI's cache is under HOME, where no rank wrote its shards: refused, and nothing is left there
    run = _cli(tmp_path, str(bare), "--prompt", "hi", "--tp", "2", "--config", _toml(tmp_path, sections))
    assert run.returncode == 2, run.stderr[-3000:]
    (line,) = run.stderr.strip().splitlines()
    assert "no weights" in line and "shards are not in" in line, line
    assert not list(tmp_path.glob(".cache/tierstore/*tp2*"))


def _toml(tmp_path, sections) -> str:
    path = tmp_path / "sections.toml"
    path.write_text("".join(f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in items.items())
                            for name, items in sections.items()))
    return str(path)


def test_a_compressed_ranks_plan_needs_no_weights_and_says_where_blocks_are_cut(tiny_dirs, tmp_path):
    """`tierstore plan --tp N --compress F` of a directory holding only config.json: a rank's compressed units, and
    whether its quantization blocks are the one-process model's (the tiny llama's 32-column halves cut nf4's
    64-element blocks; 8-bit blocks of 64 are whole in its 64-column rows only when not split)."""
    from tierstore.inference.compose import make_plan_for

    directory, _ = tiny_dirs("llama")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(Path(directory, "config.json").read_text())
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")}, "compression": {"format": "nf4"}}
    with_weights = make_plan_for(directory, {"vram": "1GB", "ram": "1GB"}, config, tensor_parallel=2)
    bare_plan = make_plan_for(str(bare), {"vram": "1GB", "ram": "1GB"}, config, tensor_parallel=2)
    assert bare_plan.device_resident == with_weights.device_resident
    assert bare_plan.device_budget_bytes == with_weights.device_budget_bytes
    assert any("config.json alone" in note for note in bare_plan.notes)
    assert any("quantized to nf4-64 by the rank itself" in note for note in bare_plan.notes)
    assert any("cut inside a quantization block" in note for note in bare_plan.notes)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.bin")), "a plan wrote units"


def test_cut_blocks_names_the_matrices_a_rank_cuts_inside_a_block(tiny_dirs, tmp_path):
    """Row cuts are whole blocks when a shard's rows hold whole blocks; column cuts need whole blocks in every row."""
    from tierstore.inference.loading.resolve import resolve
    from tierstore.inference.loading.sources import open_units
    from tierstore.inference.loading.splits import Group, cut_blocks

    from tierstore.compression import Codec
    from tierstore.config import Config

    directory, _ = tiny_dirs("llama")  # hidden 64, MLP 128
    units = open_units(resolve(directory), Config.load({"runtime": {"cache_dir": str(tmp_path)}}),
                       torch.device("cpu"), None, False, False)
    try:
        def cut(codec):
            return cut_blocks(units.skeleton, units.layouts, Group(0, 2), codec)

        nf4 = cut(Codec.create("nf4", 64))
        assert set(nf4) == {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)}  # 32 of 64 columns
        assert cut(Codec.create("int8", 64)) == nf4
        assert not cut(Codec.create("q8_0"))  # 32-element blocks
        assert len(cut(Codec.create("int8", 128))) > len(nf4)
    finally:
        units.close()


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
    from tierstore.inference.compose import make_plan_for
    from tierstore.inference.loading.resolve import resolve
    from tierstore.inference.loading.shards import shard_units
    from tierstore.inference.loading.sources import open_units
    from tierstore.inference.loading.splits import Group

    from tierstore.config import Config

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
    from tierstore.inference.loading.resolve import resolve
    from tierstore.inference.loading.shards import rank_store, shard_units
    from tierstore.inference.loading.sources import open_units
    from tierstore.inference.loading.splits import Group

    from tierstore.config import Config
    from tierstore.errors import CheckpointError

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
