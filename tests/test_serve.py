"""`tierstore serve` on SmolLM2: the OpenAI API through the openai client and plain HTTP, continuous batching
(concurrent clients get the text they get alone), the queue bound, disconnects, the API key, SIGTERM; and the
batcher itself joining sequences into a running batch."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from tierstore.inference.front.launch import free_port

pytestmark = pytest.mark.slow

KEY = "test-key"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three colors.", "Hi",
           "Explain gravity in one sentence.", "What is 2+2?", "Name a famous painter.", "Describe a cat.",
           "Why is the sky blue?", "Give me a fruit.", "What is Python?", "Say hello in Spanish.",
           "How many legs does a spider have?", "What is the largest ocean?", "Tell me a joke.", "What is rain?"]


class Server:
    """`tierstore serve` in a subprocess on a free localhost port."""

    def __init__(self, store: str, home: str, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tierstore", "serve", store, "--port", str(self.port),
                                      "--served-model-name", "smollm2", *options], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, "HOME": home})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1].decode()[-2000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError("the server did not come up in 300 s")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, err.decode()


@pytest.fixture(scope="module")
def server(smollm2_store, tmp_path_factory):
    store, _ = smollm2_store
    running = Server(store, str(tmp_path_factory.mktemp("home")), "--api-key", KEY)
    yield running
    code, err = running.stop()
    assert code == 0, err[-2000:]


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


def _chat(server, prompt: str, max_tokens: int = 24, **kw) -> tuple[str, str]:
    reply = _client(server).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=max_tokens, **kw)
    return reply.choices[0].message.content, reply.choices[0].finish_reason


def test_openai_client_streams_a_chat_completion(server):
    stream = _client(server).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # streamed, not one piece
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens > 0
    assert [m.id for m in _client(server).models.list()] == ["smollm2"]


def test_concurrent_greedy_clients_get_the_text_they_get_alone(server):
    alone = [_chat(server, prompt, temperature=0) for prompt in PROMPTS]
    before = server.health()
    together: list = [None] * len(PROMPTS)

    def ask(index: int) -> None:
        together[index] = _chat(server, PROMPTS[index], temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = server.health()
    assert together == alone
    passes, tokens = after["passes"] - before["passes"], after["tokens"] - before["tokens"]
    assert tokens / passes > 4, f"{tokens} tokens in {passes} passes: the clients were not batched"


def test_completions_sampling_settings_and_stop(server):
    client = _client(server)
    text = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5,
                                     temperature=0)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 5
    # a stop string ends the text before it, also when it spans tokens
    whole, _ = _chat(server, PROMPTS[0], temperature=0)
    cut, reason = _chat(server, PROMPTS[0], temperature=0, stop=["of Fr"])
    assert (cut, reason) == (whole[:whole.index("of Fr")], "stop")
    # the same seed gives the same sample, alone or beside others
    results: list = [None] * 3

    def sample(index: int) -> None:
        results[index] = _chat(server, "Tell me a story.", max_tokens=16, temperature=1.0, top_p=0.9, seed=7)

    threads = [threading.Thread(target=sample, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[1] == results[2]


def test_bad_requests_get_openai_errors(server):
    def post(body: str, content_type: str = "application/json") -> httpx.Response:
        return httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type})

    ok = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = {
        "not json": ("{bad", "not valid JSON"),
        "unknown model": (json.dumps({**ok, "model": "gpt-9"}), "not served here"),
        "max_tokens too large": (json.dumps({**ok, "max_tokens": 10 ** 6}), "exceeds"),
        "no messages": (json.dumps({**ok, "messages": []}), "messages"),
        "temperature": (json.dumps({**ok, "temperature": "hot"}), "temperature"),
        "n": (json.dumps({**ok, "n": 2}), "n=2"),
    }
    for name, (body, expected) in cases.items():
        response = post(body)
        assert response.status_code == 400, name
        error = response.json()["error"]
        assert expected in error["message"] and error["type"] == "invalid_request_error", (name, error)
    response = post(json.dumps(ok), content_type="text/plain")
    assert response.status_code == 400 and "JSON object sent as application/json" in response.json()["error"]["message"]
    assert post(json.dumps(ok)).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{server.url}/v1/chat/completions", json=ok, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert server.health()["active"] == 0 and server.health()["waiting"] == 0  # nothing left behind


def test_load_reports_throughput_and_latency(server):
    """A bounded load: 32 requests, 8 at a time, within 300 s, through the benchmark script."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_serve.py")
    out = subprocess.run([sys.executable, script, "--url", f"{server.url}/v1", "--model", "smollm2", "--api-key", KEY,
                          "--requests", "32", "--concurrency", "8", "--max-tokens", "16", "--time-limit", "300",
                          "--json"], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    print(f"load: {result['requests_per_s']:.2f} requests/s, {result['tokens_per_s']:.1f} tokens/s, latency p50 "
          f"{result['latency_p50_s']:.2f} s p99 {result['latency_p99_s']:.2f} s")
    assert result["ok"] == 32 and result["failed"] == 0 and result["tokens"] > 32
    assert 0 < result["latency_p50_s"] <= result["latency_p99_s"] < 300


def test_queue_bound_disconnect_and_sigterm(smollm2_store, tmp_path):
    """One row and one waiting place: a third request gets 429; a client that goes away frees its row for the
    waiting one; SIGTERM lets the request in flight finish, then the server exits 0."""
    store, _ = smollm2_store
    small = Server(store, str(tmp_path), "--max-batch", "1", "--max-queue", "1")
    try:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.Client(timeout=300) as first_client:
            with first_client.stream("POST", f"{small.url}/v1/chat/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")  # running: it holds the batch's one row
                waiting: dict = {}
                second = threading.Thread(target=lambda: waiting.update(
                    reply=httpx.post(f"{small.url}/v1/chat/completions", timeout=300,
                                     json={**body, "stream": False, "max_tokens": 4})))
                second.start()
                _until(lambda: small.health()["waiting"] == 1)
                third = httpx.post(f"{small.url}/v1/chat/completions", json={**body, "stream": False}, timeout=60)
                assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
            # the first client is gone mid-stream: its sequence is cancelled, the waiting one runs
        second.join(timeout=300)
        assert waiting["reply"].status_code == 200
        assert waiting["reply"].json()["usage"]["completion_tokens"] == 4
        _until(lambda: small.health()["active"] == 0)
        assert small.health()["tokens"] < 1000  # the 2000-token story stopped when its client left
        # SIGTERM while a request is in flight: it completes, then the process exits 0
        with httpx.Client(timeout=300) as client:
            with client.stream("POST", f"{small.url}/v1/chat/completions", json={**body, "max_tokens": 40}) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                small.proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        small.proc.wait(timeout=120)  # it exits on its own: `stop` would signal again while it shuts down
    finally:
        code, err = small.stop()
    assert code == 0, err[-2000:]


def _until(condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("options, message", [
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--draft", "ngram"], "--draft speculates for one sequence"),
])
def test_serve_refuses_bad_options_in_one_line(options, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "tierstore", "serve", "smollm2", *options], capture_output=True,
                         text=True, env={**os.environ, "HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_serve_refuses_a_port_in_use(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "tierstore", "serve", "smollm2", "--port", str(port)],
                             capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr
    assert not list(tmp_path.rglob("*.safetensors"))  # refused before anything was converted


def _alone(model, prompts: list[str], max_new_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt's chat-templated ids, and the greedy tokens `model` gives it alone (up to its end token)."""
    import torch

    tok = model.tokenizer
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False).input_ids for p in prompts]
    alone = [model.generate(torch.tensor([row]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(row):]
             .tolist() for row in ids]
    return ids, [row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row for row in alone]


def test_batcher_joins_running_batches_and_matches_alone(smollm2_store, tmp_path):
    """Sequences joining a running batch, both beside its next tokens and in a pass of their own, get the
    greedy tokens they get alone; the cache stays compact."""
    import tierstore
    from tierstore.inference.front.batcher import Batcher, SamplingParams

    store, _ = smollm2_store
    with tierstore.AutoModel.from_pretrained(store, config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        ids, alone = _alone(model, PROMPTS[:6], 20)
        batcher = Batcher(model, max_batch=8, max_queue=8, max_seq_tokens=512)
        done = {index: threading.Event() for index in range(6)}
        shapes: list[tuple[int, int]] = []  # (cache columns, longest row's real tokens) seen between steps

        def submit(index: int):
            def on_event(event):
                mask = batcher.mask
                if mask is not None and mask.numel():
                    shapes.append((mask.shape[1], int(mask.sum(dim=1).max())))
                if event.finish_reason:
                    done[index].set()
            return batcher.submit(ids[index], SamplingParams(max_tokens=20, temperature=0), on_event)

        sequences = [submit(0)]
        _until(lambda: len(sequences[0].tokens) >= 3)
        sequences += [submit(i) for i in (1, 2, 3)]  # three prompts beside one running row: one shared pass
        _until(lambda: all(len(s.tokens) >= 2 for s in sequences))
        assert batcher.prefills_apart == 0
        sequences += [submit(4)]  # one prompt beside four running rows: a pass of its own
        _until(lambda: len(sequences[4].tokens) >= 1)
        assert batcher.prefills_apart == 1
        sequences += [submit(5)]
        for event in done.values():
            assert event.wait(120)
        assert [s.tokens for s in sequences] == alone
        assert batcher.steps < sum(len(row) for row in alone)  # rows shared passes
        _until(lambda: batcher.mask is None)  # every row left: the cache is freed once the step ends
        # masked columns were dropped or repacked: never more than the slack beyond the longest row, plus a prompt
        assert all(columns <= 1.25 * real + 16 + max(map(len, ids)) for columns, real in shapes), shapes
        batcher.close()


def test_static_rows_give_each_sequence_its_tokens_alone_and_restore_prefixes(smollm2_store, tmp_path):
    """The batch cache kept as static rows (the layout whose decode steps replay CUDA graphs; eager on a CPU):
    six requests through four rows get the greedy tokens they get alone, rows left free mid-batch take the last
    rows' sequences, and a prompt continuing a finished sequence restores that sequence's KV into its row."""
    import torch

    import tierstore
    from tierstore.inference.front.batcher import Batcher, SamplingParams

    store, _ = smollm2_store
    with tierstore.AutoModel.from_pretrained(store, config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        ids, alone = _alone(model, PROMPTS[:6], 16)
        lengths = [16, 3, 16, 10, 5, 16]  # the second and fifth leave early, freeing rows before running ones
        batcher = Batcher(model, max_batch=4, max_queue=8, max_seq_tokens=512, static_rows=True)
        sequences = [batcher.submit(row, SamplingParams(max_tokens=length, temperature=0), lambda event: None)
                     for row, length in zip(ids, lengths)]
        _until(lambda: all(s.finish_reason for s in sequences))
        assert [s.tokens for s in sequences] == [row[:length] for row, length in zip(alone, lengths)]
        assert batcher._rows.moves >= 1 and batcher.mask is None and batcher.graphed is False
        follow = ids[0] + alone[0] + ids[2][-6:]  # the first conversation's next turn
        want = model.generate(torch.tensor([follow]), max_new_tokens=8, do_sample=False)[0, len(follow):].tolist()
        hits = batcher.prefixes.stats.hits
        sequence = batcher.submit(follow, SamplingParams(max_tokens=8, temperature=0), lambda event: None)
        _until(lambda: sequence.finish_reason is not None)
        assert sequence.tokens == want[:len(sequence.tokens)] and len(sequence.tokens) >= 1
        assert batcher.prefixes.stats.hits == hits + 1
        assert batcher._rows.reused_tokens >= len(ids[0]) + len(alone[0]) - 1  # the turn's prefix was not fed
        first = [batcher.submit(row, SamplingParams(max_tokens=16, temperature=0), lambda event: None)
                 for row in ids[:3]]
        _until(lambda: all(len(s.tokens) >= 2 for s in first))
        batcher.cancel(first[0])  # the first row leaves mid-batch: the last row's sequence moves into it
        _until(lambda: all(s.finish_reason for s in first))
        assert first[0].finish_reason == "cancelled"
        assert [s.tokens for s in first[1:]] == alone[1:3]
        batcher.close()


def test_the_batcher_admits_requests_while_their_kv_cache_fits_its_tokens(smollm2_store, tmp_path):
    """The KV cache is held to its size in tokens: a request joins only while the batch, every row grown to its
    max_tokens, still fits. Short requests then share passes in larger numbers than sequences of the longest
    length would, a tight size keeps fewer rows at a time, and each request gets the tokens it gets alone."""
    import tierstore
    from tierstore.inference.front.batcher import Batcher, SamplingParams
    from tierstore.inference.placement.kv import kv_cache_tokens

    store, _ = smollm2_store
    with tierstore.AutoModel.from_pretrained(store, config={"runtime": {"cache_dir": str(tmp_path)}}) as model:
        ids, alone = _alone(model, PROMPTS[:8], 12)
        longest = max(map(len, ids)) + 12
        for cache_tokens in (kv_cache_tokens(2, 512), 3 * longest):  # two sequences of 512 tokens; three short
            batcher = Batcher(model, max_batch=8, max_queue=8, max_seq_tokens=512, cache_tokens=cache_tokens)
            shapes: list[tuple[int, int]] = []  # (rows, columns) of the cache after each pass

            def on_event(event):
                shapes.append(tuple(batcher.mask.shape))

            sequences = [batcher.submit(row, SamplingParams(max_tokens=12, temperature=0), on_event) for row in ids]
            _until(lambda: all(s.finish_reason for s in sequences))
            batcher.close()
            assert [s.tokens for s in sequences] == alone
            assert all(rows * columns <= cache_tokens for rows, columns in shapes), (cache_tokens, shapes)
            peak = max(rows for rows, _ in shapes)
            if cache_tokens == 3 * longest:
                assert 2 <= peak <= 3, shapes
            else:
                assert peak == 8, shapes  # all at once, in the room of two sequences of the longest length


def test_the_largest_batch_puts_its_kv_cache_in_host_ram_when_the_device_cannot_hold_it(smollm2_store, tmp_path):
    """At vram 700 MB / ram 1 GB a GPU holds the KV cache of a few 1000-token sequences beside SmolLM2's
    weights; the RAM budget's room beside the weights holds more: as large a batch as fits there, with three
    layers of it on the device. `runtime.kv_cache = "device"` keeps the device's smaller batch. Planning only
    (nothing runs a forward): the CPU stands in for a GPU, where the cache is transformers' offloaded
    DynamicCache."""

    import tierstore
    from tierstore.inference.placement.kv import COLUMN_SLACK, largest_batch
    from tierstore.inference.placement.budgets import ACTIVATION_SLACK_BYTES, kv_bytes_per_token

    store, _ = smollm2_store
    batches = {}
    for where in ("auto", "device"):
        config = {"runtime": {"cache_dir": str(tmp_path), "kv_cache": where}}
        with tierstore.AutoModel.from_pretrained(store, budget={"vram": "700MB", "ram": "1GB"},
                                                 config=config) as model:
            model.kv_budget = dataclasses.replace(model.kv_budget, separate_device=True)  # plan as for a GPU
            per_sequence = kv_bytes_per_token(model.model.config, model.model.dtype) * 1000 * COLUMN_SLACK
            room = 1_000_000_000 - sum(layout.nbytes for layout in model.store.layouts.values())
            batches[where], notes = largest_batch(model, 4096, 1000)
            assert model.kv_on_host == (where == "auto")
            assert any("in host RAM" in note for note in notes) == (where == "auto"), notes
            if where == "auto":
                assert batches[where] == int(room // per_sequence), (batches, notes)
                assert any(f"KV cache of {batches[where] * 1250} tokens" in note for note in notes), notes
                # three of its 30 layers on the device, beside the activations
                kept = model.plan.device_reserve_bytes - ACTIVATION_SLACK_BYTES
                assert kept == pytest.approx(per_sequence * batches[where] * 3 / 30, rel=0.01)
            ram = ", and more than the .* the RAM budget leaves beside the host tier" if where == "auto" else ""
            with pytest.raises(tierstore.InputError, match=f"more than the device budget 700MB leaves beside the "
                                                           f"weights{ram}; use fewer"):
                model.fit_kv_cache(int(room // per_sequence * 4 * 1250), tiered=False)  # the batcher's cache
    assert 1 <= batches["device"] < batches["auto"], batches


def test_the_largest_batch_keeps_a_streamed_unit_in_flight_beside_the_one_computing(tiny_dirs, cache_config):
    """Each sequence's KV cache takes device room from the streamed layers: past a point only one layer fits at a
    time, and copies and compute take turns. The batch stops short of that point, and says so. Planning only:
    the CPU stands in for a GPU."""

    import tierstore
    from tierstore.errors import BudgetError
    from tierstore.inference.placement.kv import kv_cache_tokens, largest_batch
    from tierstore.inference.placement.budgets import ACTIVATION_SLACK_BYTES

    directory, reference = tiny_dirs("llama")
    layer = sum(p.numel() for p in reference.model.layers[0].parameters()) * 4
    config = {**cache_config, "runtime": {**cache_config.get("runtime", {}), "kv_cache": "device"}}
    with tierstore.AutoModel.from_pretrained(directory, budget={"vram": int(ACTIVATION_SLACK_BYTES + 3.5 * layer),
                                                                "ram": "100MB"}, config=config) as model:
        model.kv_budget = dataclasses.replace(model.kv_budget, separate_device=True)  # plan as for a GPU
        batch, notes = largest_batch(model, 4096, 4)
        assert model.plan.streamed_from_host and model.plan.prefetch_depth >= 1
        held = int(notes[0].split(", not the ")[1].split()[0])
        assert batch < held, notes
        assert notes[0].startswith(f"batch {batch}, not the {held} the budgets hold"), notes
        for larger in (batch + 1, held):  # one unit in flight at a time, from the next batch on
            plan = model.kv_placement(kv_cache_tokens(larger, 4))[1]
            assert plan.prefetch_depth == 0, (larger, plan.prefetch_depth)
        with pytest.raises(BudgetError):
            model.kv_placement(kv_cache_tokens(held + 1, 4))


def test_the_host_kv_cache_fetches_a_layer_only_after_the_compute_queued_before_it(monkeypatch):
    """The host cache copies each layer back on the compute stream and fetches the next one on its own stream:
    the fetch must wait for the compute stream, or it reads a host copy not yet written (transformers before
    5.20 did not wait). Streams are stood in for by recorders, so the order is checked on a CPU."""
    import torch
    from tierstore.inference.runtime.host_cache import HostKVCache
    from transformers import DynamicCache, LlamaConfig

    order = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            order.append(f"{self.name} waits for {other.name}")

    compute = Stream("compute")
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: compute)
    monkeypatch.setattr(DynamicCache, "prefetch", lambda self, layer_idx, only_non_sliding=True:
                        order.append(f"prefetch {layer_idx}"))
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=100)
    cache = HostKVCache(config)
    cache.prefetch_stream = Stream("fetch")
    for layer in (0, 1, 0):
        cache.update(torch.ones(1, 4, 1, 16), torch.ones(1, 4, 1, 16), layer)
    fetches = [i for i, step in enumerate(order) if step.startswith("prefetch")]
    assert len(fetches) == 3, order
    for earlier, at in enumerate(fetches):  # a wait of its own before each fetch
        assert order[:at].count("fetch waits for compute") > earlier, order
