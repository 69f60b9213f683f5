"""Bad input gets one clear line and exit 2; nothing half-written is left behind."""
import json
import os
import struct
import subprocess
import sys

import pytest
from tierstore.inference.front.cli import main


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _one_line(err):
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def tiny_dir(tiny_dirs):
    return tiny_dirs("llama")[0]


@pytest.mark.parametrize("argv, words", [
    (["plan", "{tiny}", "--vram", "4GX"], ["budget.vram", "4GX"]),
    (["plan", "{tiny}", "--vram", "lots"], ["budget.vram", "lots"]),
    (["plan", "{tiny}", "--vram=-1GB"], ["budget.vram", "negative"]),
    (["plan", "{tiny}", "--vram", "1KB", "--ram", "1GB"], ["device budget", "needs", "bytes"]),
    (["plan", "/nonexistent/model"], ["/nonexistent/model", "no such file"]),
    (["plan", "{empty}"], ["empty"]),
    (["generate", "{config_only}", "--prompt", "hi"], ["no weights", "tierstore plan"]),
    (["plan", "{tiny}", "--tp", "2", "--config", "{calibrated}"], ["calibration", "--tp"]),
    (["plan", "{not_gguf}"], ["not a GGUF"]),
    (["plan", "{truncated}"], ["truncated"]),
    (["plan", "{lying}"], ["offsets"]),
    (["plan", "{remote}"], ["trust_remote_code"]),
    (["plan", "{unknown_arch}"], ["not known to transformers"]),
    (["plan", "{tiny}", "--config", "{bad_toml}"], ["bad.toml", "line"]),
    (["plan", "{tiny}", "--config", "{bad_key}"], ["policy.devise"]),
    (["plan", "{tiny}", "--config", "{bad_policy}"], ["'random'", "lru"]),
    (["plan", "{tiny}", "--config", "{neg_depth}"], ["prefetch_depth", "-2"]),
    (["generate", "{tiny}", "--prompt", "   "], ["empty"]),
    (["generate", "{tiny}", "--prompt", "hi", "--max-new-tokens", "0"], ["max-new-tokens"]),
    (["generate", "{tiny}", "--prompt", "hi", "--max-new-tokens", "-3"], ["max-new-tokens"]),
    (["generate", "{tiny}", "--prompt", "hi", "--max-new-tokens", "many"], ["invalid int"]),
    (["generate", "{tiny}", "--prompt", "hi", "--trace", "{not_gguf}/run.json"], ["trace file", "not a directory"]),
    (["generate", "{tiny}", "--prompt", "hi", "--trace", "{empty}"], ["trace file", "is a directory"]),
    (["plot", "{not_gguf}"], ["model.gguf", "not JSON"]),
    (["plot", "{config_only}/config.json"], ["not a tierstore trace"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_bad_input_is_one_line_exit_2(argv, words, tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the default cache dir lands in the test's tmp
    paths = _bad_inputs(tmp_path, tiny_dir)
    argv = [arg.format(**paths) for arg in argv]
    before = _snapshot(tmp_path)
    try:
        code, err = _run(argv, capsys)
    except SystemExit as exc:  # argparse errors
        code, err = exc.code, capsys.readouterr().err.strip()
    assert code == 2
    line = _one_line(err)
    for word in words:
        assert word in line, line
    assert _snapshot(tmp_path, skip="cache") == {k: v for k, v in before.items() if "cache" not in k}


def _snapshot(root, skip=None):
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if skip and skip in path:
                continue
            out[path] = os.path.getsize(path)
    return out


def _bad_inputs(tmp_path, tiny_dir):
    paths = {"tiny": tiny_dir}
    (tmp_path / "empty").mkdir()
    paths["empty"] = str(tmp_path / "empty")
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text(open(os.path.join(tiny_dir, "config.json")).read())
    paths["config_only"] = str(config_only)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"NOPE" + b"\0" * 64)
    paths["not_gguf"] = str(not_gguf)
    source = open(os.path.join(tiny_dir, "model.safetensors"), "rb").read()
    for name, data in (("truncated", source[:len(source) // 2]), ("lying", _lying(source))):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(open(os.path.join(tiny_dir, "config.json")).read())
        (directory / "model.safetensors").write_bytes(data)
        paths[name] = str(directory)
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "chatglm", "architectures": ["ChatGLMModel"],
                                                    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"}}))
    (remote / "model.safetensors").write_bytes(source)
    paths["remote"] = str(remote)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "frobnet", "architectures": ["FrobNet"]}))
    (unknown / "model.safetensors").write_bytes(source)
    paths["unknown_arch"] = str(unknown)
    for name, text in (("bad_toml", '[budget]\nvram = \n'), ("bad_key", '[policy]\ndevise = "lru"\n'),
                       ("bad_policy", '[policy]\ndevice = "random"\n'),
                       ("neg_depth", '[policy]\nprefetch_depth = -2\n'),
                       ("calibrated", '[compression]\nformat = "q4_k"\ncalibration = "bundled"\n')):
        (tmp_path / f"{name.replace('_', '')}.toml").write_text(text)
        paths[name] = str(tmp_path / f"{name.replace('_', '')}.toml")
    paths["bad_toml"] = str(tmp_path / "bad.toml")
    (tmp_path / "bad.toml").write_text('[budget]\nvram = \n')
    return paths


def _lying(data: bytes) -> bytes:
    """A safetensors file whose header claims a tensor ends past the end of the file."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 4]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + size:]


def test_prompt_longer_than_the_context(tiny_dirs, tmp_path):
    import torch

    import tierstore

    directory, _ = tiny_dirs("llama")
    with tierstore.AutoModel.from_pretrained(directory, config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        with pytest.raises(tierstore.InputError, match="context of 256"):
            model.generate(torch.ones(1, 250, dtype=torch.long), max_new_tokens=10)


def test_subprocess_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tierstore", "plan", str(tmp_path / "missing"), "--vram", "1GB"],
                            capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_plan_prints_the_table(tiny_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    code = main(["plan", tiny_dirs("llama")[0], "--vram", "400KB", "--ram", "1MB"])
    out = capsys.readouterr().out
    assert code == 0 and "tierstore plan" in out and "streamed from" in out
