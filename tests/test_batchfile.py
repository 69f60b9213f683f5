"""`generate --prompts-file in.jsonl --out out.jsonl`: batches, one line per finished prompt, resume after a kill,
and bad input refused in one line before anything runs or is written."""
import json
import os

import pytest
from tierstore.inference.front.cli import main

PROMPTS = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to three.", "Name a fruit."]


def _write_prompts(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps({"prompt": p, "id": f"q{i}"}) + "\n" for i, p in enumerate(prompts)))
    return str(path)


def _argv(store, prompts_file, out, tmp_path, *extra):
    config = tmp_path / "config.toml"
    config.write_text(f'[runtime]\ncache_dir = "{tmp_path / "cache"}"\n')
    return ["generate", store, "--prompts-file", prompts_file, "--out", out, "--max-new-tokens", "8",
            "--batch-size", "2", "--config", str(config), "--vram", "300MB", "--ram", "1GB", *extra]


def _lines(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def full_run(smollm2_store, tmp_path_factory):
    """One uninterrupted run of the five prompts: (output lines, store, work dir)."""
    tmp_path = tmp_path_factory.mktemp("batchfile")
    prompts = _write_prompts(tmp_path / "in.jsonl")
    out = str(tmp_path / "out.jsonl")
    assert main(_argv(smollm2_store[0], prompts, out, tmp_path)) == 0
    return _lines(out), smollm2_store[0], tmp_path


def test_every_prompt_gets_one_line_in_order(full_run):
    lines, _, _ = full_run
    assert [line["index"] for line in lines] == list(range(len(PROMPTS)))
    assert [line["id"] for line in lines] == [f"q{i}" for i in range(len(PROMPTS))]
    assert [line["prompt"] for line in lines] == PROMPTS
    assert all(line["text"].strip() and 1 <= len(line["tokens"]) <= 8 for line in lines)
    assert "Paris" in lines[0]["text"]


def test_a_killed_run_resumes_and_skips_what_is_done(full_run, tmp_path, capsys):
    """A kill leaves two whole lines and half of the third; the next run drops the half line, generates the last
    three, and the file ends as the uninterrupted run's."""
    lines, store, work = full_run
    with open(work / "out.jsonl", "rb") as handle:
        whole = handle.read().splitlines(keepends=True)
    out = tmp_path / "resumed.jsonl"
    out.write_bytes(whole[0] + whole[1] + whole[2][:len(whole[2]) // 2])
    code = main(_argv(store, str(work / "in.jsonl"), str(out), tmp_path, "--report-json",
                      str(tmp_path / "report.json")))
    assert code == 0
    assert _lines(out) == lines
    assert "3 prompts generated (2 already in" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["generated"], report["skipped"], report["batch_size"]) == (3, 2, 2)
    assert report["last_batch"]["timing"]["batch_size"] == 1  # the fifth prompt ran alone


@pytest.mark.parametrize("case, words", [
    ("bad json", ["line 2", "not JSON"]),
    ("no prompt", ["line 1", "\"prompt\""]),
    ("empty file", ["holds no prompts"]),
    ("other results", ["line 1", "another prompt", "--out"]),
    ("both", ["--prompt", "--prompts-file", "not both"]),
    ("neither", ["give --prompt", "or --prompts-file"]),
    ("no out", ["--prompts-file and --out go together"]),
    ("zero batch", ["--batch-size", "at least 1"]),
])
def test_bad_input_is_one_line_and_writes_nothing(case, words, full_run, tmp_path, capsys):
    _, store, work = full_run
    prompts = _write_prompts(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    argv = _argv(store, prompts, str(out), tmp_path)
    if case == "bad json":
        (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    elif case == "no prompt":
        (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    elif case == "empty file":
        (tmp_path / "in.jsonl").write_text("\n")
    elif case == "other results":
        out.write_text(json.dumps({"index": 0, "prompt": "something else", "text": "x", "tokens": [1]}) + "\n")
    elif case == "both":
        argv += ["--prompt", "hi"]
    elif case == "neither":
        argv = [arg for arg in argv if arg not in ("--prompts-file", prompts, "--out", str(out), "--batch-size", "2")]
    elif case == "no out":
        argv = [arg for arg in argv if arg not in ("--out", str(out))]
    elif case == "zero batch":
        argv[argv.index("--batch-size") + 1] = "0"
    before = out.read_bytes() if out.exists() else None
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err, err
    assert (out.read_bytes() if out.exists() else None) == before
    assert not os.path.exists(tmp_path / "cache")  # refused before the model was opened or converted


def test_a_finished_file_opens_no_model(full_run, tmp_path, capsys):
    lines, store, work = full_run
    out = tmp_path / "done.jsonl"
    out.write_bytes((work / "out.jsonl").read_bytes())
    argv = _argv(store, str(work / "in.jsonl"), str(out), tmp_path)
    argv[1] = str(tmp_path / "no-such-model")  # never opened: every prompt is already done
    assert main(argv) == 0
    assert "0 prompts generated (5 already in" in capsys.readouterr().out
    assert _lines(out) == lines
