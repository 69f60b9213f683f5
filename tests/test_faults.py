"""Faults lose nothing: corrupt or truncated units are caught before use, killed conversions resume."""
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tierstore.inference.loading.convert import convert
from tierstore.inference.loading.resolve import resolve

import tierstore

PROMPT = torch.tensor([[5, 9, 33, 7, 81, 100, 3]])


def _generate(store_dir, tmp_path, **kw):
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")}}
    with tierstore.AutoModel.from_pretrained(store_dir, config=config, **kw) as model:
        return model.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist()


def test_converted_store_generates_the_reference_tokens(bin_checkpoint, tmp_path):
    source, reference = bin_checkpoint
    store = convert(resolve(source), str(tmp_path / "store"), progress=False)
    assert _generate(store, tmp_path) == reference.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist()
    assert not [f for _, _, files in os.walk(store) for f in files if f.startswith(".tmp-") or f.endswith(".json")
                and f != "manifest.json" and "token" not in f and f != "config.json"
                and f != "generation_config.json"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_unit_is_caught_before_any_token(bin_checkpoint, tmp_path, damage):
    source, _ = bin_checkpoint
    store = convert(resolve(source), str(tmp_path / "store"), progress=False)
    path = os.path.join(store, "units", "layers.2.bin")
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        offset = random.Random(3).randrange(len(data))
        data[offset] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    open(path, "wb").write(bytes(data))
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")}}
    with tierstore.AutoModel.from_pretrained(store, config=config) as model:
        produced = []
        with pytest.raises(tierstore.CheckpointError, match="layers.2.bin"):
            model.generate(PROMPT, max_new_tokens=8, do_sample=False,
                           streamer=type("S", (), {"put": lambda s, v: produced.append(v), "end": lambda s: None})())
        assert len(produced) == 1  # only the prompt was streamed: no token came from the damaged unit


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from tierstore import files
    from tierstore.inference.loading import store_writer
    from tierstore.inference.loading.convert import convert
    calls = {"n": 0}
    real = files.write_atomic
    def write_then_die(path, data):
        calls["n"] += 1
        if calls["n"] == int(sys.argv[3]):
            with open(os.path.join(os.path.dirname(path), ".tmp-partial"), "wb") as f:
                f.write(bytes(data)[: len(data) // 2])   # a write cut short
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
    store_writer.write_atomic = write_then_die  # where every unit file of a store is written
    from tierstore.inference.loading.resolve import resolve
    convert(resolve(sys.argv[1]), sys.argv[2], progress=False)
""")


@pytest.mark.parametrize("kill_at", [1, 4, 9, 15])
def test_killed_conversion_resumes(bin_checkpoint, tmp_path, kill_at):
    source, reference = bin_checkpoint
    out = str(tmp_path / "store")
    result = subprocess.run([sys.executable, "-c", _KILLER, source, out, str(kill_at)], capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    convert(resolve(source), out, progress=False)
    assert _generate(out, tmp_path) == reference.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist()
    leftovers = [f for _, _, files in os.walk(out) for f in files if f.startswith(".tmp-")]
    assert leftovers == []


def test_write_error_during_conversion_is_clean(bin_checkpoint, tmp_path):
    source, _ = bin_checkpoint
    out = str(tmp_path / "store")
    script = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))   # a 'disk' that fills mid-unit
        from tierstore.inference.front.cli import main
        sys.exit(main(["convert", sys.argv[1], sys.argv[2]]))
    """)
    before = {f: os.path.getsize(os.path.join(source, f)) for f in os.listdir(source)}
    result = subprocess.run([sys.executable, "-c", script, source, out], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert [f for _, _, files in os.walk(out) for f in files if f.startswith(".tmp-")] == []
    assert {f: os.path.getsize(os.path.join(source, f)) for f in os.listdir(source)} == before


def test_two_converters_at_once_make_one_good_store(bin_checkpoint, tmp_path):
    source, reference = bin_checkpoint
    out = str(tmp_path / "store")
    script = ("import sys; from tierstore.inference.front.cli import main; "
              "sys.exit(main(['convert', sys.argv[1], sys.argv[2]]))")
    procs = [subprocess.Popen([sys.executable, "-c", script, source, out], stderr=subprocess.PIPE) for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    assert _generate(out, tmp_path) == reference.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist()


def test_read_only_store(bin_checkpoint, tmp_path, monkeypatch):
    """A store that cannot be written (simulated: the lock file cannot be created) still serves generation;
    converting into it says it cannot write there."""
    source, reference = bin_checkpoint
    store = convert(resolve(source), str(tmp_path / "store"), progress=False)
    real_open = open

    def read_only_open(path, mode="r", *args, **kwargs):
        if str(path).startswith(store) and any(m in mode for m in "wa+"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_open)
    assert _generate(store, tmp_path) == reference.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist()
    other = str(tmp_path / "store2")
    os.makedirs(other)
    monkeypatch.setattr("builtins.open", lambda p, m="r", *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(p))) if str(p).startswith(other) and any(c in m for c in "wa+")
        else real_open(p, m, *a, **k))
    with pytest.raises(tierstore.CheckpointError, match="cannot write"):
        convert(resolve(source), other, progress=False)
