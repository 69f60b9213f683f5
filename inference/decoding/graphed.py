"""Decode steps replayed from a CUDA graph, for a model whose every unit stays on the device: the launch floor.

A decode step of a resident 7B model launches about a thousand kernels from Python: 0.056 s/token in transformers
on an H200, where reading its 15 GB from HBM takes about 3 ms. Here a step runs over buffers at fixed addresses
(the token fed, its position, an attention bias computed from that position on the device, a static KV cache and
the logits), so it is captured once and replayed: a step costs one graph launch, the choice of the next token and
reading that token back. `refusal` says which calls cannot run this way (units streamed through slots change
their addresses; routed experts copied as picked and host-tier KV caches sync inside the pass) and why. Routed
experts read in place (inference/runtime/mapped_experts.py) need no host inside the pass: a hook between replays
does their bookkeeping.

The prompt is fed eagerly, in chunks, into the same cache with a 4D bias (causal inside the chunk). Decoding
attends through a bias over the whole buffer (SDPA's memory-efficient kernel) where transformers' decode runs its
flash kernel, so tokens equal transformers' up to the kernels' rounding: a bf16 tie can part them.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from ...trace import PASSES, Tracer
from .layer_graphs import LayerGraphs
from .sampling import Choose
from .static_forward import StaticKV, causal_bias, feed_prompt_static, record_graph

log = logging.getLogger(__name__)

ROUND_TOKENS = 256  # buffers are sized in these steps, so calls of similar lengths reuse one graph
LAYER_ROUND_TOKENS = 64  # the same for a streamed model's buffers (graphs of its resident layers)
# generation settings that change the decode loop, with the values that leave it plain (what it runs)
PLAIN_SETTINGS: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1), "num_beam_groups": (None, 1), "num_return_sequences": (None, 1),
    "penalty_alpha": (None,), "diversity_penalty": (None, 0.0), "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "min_p": (None,), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0), "bad_words_ids": (None,), "force_words_ids": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "guidance_scale": (None, 1.0), "renormalize_logits": (None, False),
    "exponential_decay_length_penalty": (None,), "stop_strings": (None,), "max_time": (None,),
    "use_cache": (None, True), "output_attentions": (None, False), "output_hidden_states": (None, False),
    "output_scores": (None, False), "output_logits": (None, False), "return_dict_in_generate": (None, False),
    "cache_implementation": (None,), "watermarking_config": (None,), "dola_layers": (None,),
    "prompt_lookup_num_tokens": (None,), "assistant_early_exit": (None,),
}


@dataclasses.dataclass
class GraphStats:
    """One generate call's decode steps: how many replayed the graph, the capture's seconds, and the host's
    seconds issuing the steps (graph launch, next-token choice; not the wait for the device)."""

    steps: int = 0
    capture_s: float = 0.0
    host_s: float = 0.0

    @property
    def host_step_s(self) -> float | None:
        return self.host_s / self.steps if self.steps else None


def refusal(generation_config: Any, kwargs: dict[str, Any], config: Any, input_ids: torch.Tensor,
            total_tokens: int) -> str | None:
    """Why a generate call with these arguments cannot be graphed (None: it can), as a note's words. The model
    side (every unit on the device, no routed experts, the KV cache on the device) is the caller's to check.
    Arguments that are no generation setting (a cache, logits processors, stopping criteria, a generation config)
    are refused by name; settings beyond plain decoding by `PLAIN_SETTINGS`."""
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        return "the prompts are padded (an attention mask with zeros)"
    settings, unused = call_settings(generation_config, kwargs)
    if unused:
        return f"generate was given {', '.join(sorted(unused))}"
    pad = settings.pad_token_id
    if input_ids.shape[0] > 1 and pad is not None and bool((input_ids == pad).any()):
        return "the prompts hold the pad token (transformers reads that as padding)"
    changed = sorted(name for name, plain in PLAIN_SETTINGS.items() if getattr(settings, name, None) not in plain)
    if changed:
        return f"generation settings {', '.join(changed)}"
    return attention_refusal(config, total_tokens)


def attention_refusal(config: Any, total_tokens: int) -> str | None:
    """Why a model's attention cannot run over a static buffer through a bias for sequences of `total_tokens`
    (None: it can)."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or ()
    if window and (not layer_types or "sliding_attention" in layer_types) and total_tokens > window:
        return f"the sequence outgrows the sliding window of {window} tokens"
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation not in ("sdpa", "eager"):
        return f"{implementation} takes no attention bias"
    return None


def call_settings(generation_config: Any, kwargs: dict[str, Any]) -> tuple[Any, set[str]]:
    """The generation settings a call runs with (the model's, updated by the call's arguments), and the arguments
    that are no generation setting (a model input, which the graphed loop does not pass on)."""
    import copy

    settings = copy.deepcopy(generation_config)
    unused = settings.update(**{key: value for key, value in kwargs.items()
                                if key not in ("streamer", "attention_mask")})
    return settings, {key for key, value in unused.items() if value is not None}


class _Readback:
    """A step's tokens and which rows have ended, copied to the host without waiting (`start`), and read there
    (`emit`). Where launching a step costs the host a good share of the step (`ahead`: a streamed model's eager
    parts, about a millisecond of a 7 ms step), the loop queues the next step before reading the last one's tokens,
    so that the host's work overlaps the device's instead of following it; a call that ends then has queued one step
    it does not use, which the share bounds (AHEAD_SHARE: paid back within 1 / AHEAD_SHARE tokens)."""

    AHEAD_SHARE = 0.05
    DEVICES = ("cuda",)  # where a step runs ahead (elsewhere `_step` computes it: nothing to overlap; a test adds cpu)

    def __init__(self, rows: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self._runs_ahead = device.type in self.DEVICES
        self.tokens = torch.empty(rows, dtype=torch.long, pin_memory=pinned)
        self.finished = torch.empty(rows, dtype=torch.bool, pin_memory=pinned)
        self.copied = torch.cuda.Event() if pinned else None
        self.waiting = False
        self.launch_s: float | None = None  # the host's time launching the last step
        self._emitted_s: list[float] = []  # when the last two steps' tokens reached the host

    def ahead(self) -> bool:
        """Whether to queue the next step before reading the last one's tokens: launching took more than
        AHEAD_SHARE of the time between tokens."""
        return self._runs_ahead and self.launch_s is not None and len(self._emitted_s) == 2 and \
            self.launch_s > self.AHEAD_SHARE * (self._emitted_s[1] - self._emitted_s[0])

    def start(self, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        """Queue the copies of `tokens` and `finished` (the host's buffers are free: the last ones were read)."""
        self.tokens.copy_(tokens, non_blocking=True)
        self.finished.copy_(finished, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.waiting = True

    def emit(self, streamer: Any, on_token: Callable[[], None]) -> bool:
        """Wait for the copies, hand the tokens on (`on_token`, the streamer); whether every row has ended."""
        if self.copied is not None:
            self.copied.synchronize()
        self.waiting = False
        self._emitted_s = [*self._emitted_s[-1:], time.perf_counter()]
        on_token()
        if streamer is not None:
            streamer.put(self.tokens.clone())
        return bool(self.finished.all())


class GraphedDecoder:
    """Plain decoding (greedy or sampled) of one resident model with its steps replayed from a CUDA graph; or, with
    `layers`, of a model that streams some layers, its steps eager but its resident layers replayed from graphs of
    their own (layer_graphs.py). Graphs and buffers are kept for the next call of the same batch size and buffer
    length."""

    def __init__(self, model: Any, device: torch.device, before_replay: Callable[[], None] | None = None,
                 tracer: Tracer | None = None, layers: LayerGraphs | None = None,
                 feed: Callable[[StaticKV, torch.Tensor], torch.Tensor] | None = None) -> None:
        """`before_replay`: called before each replay (work a replay cannot do: the routed experts' bookkeeping,
        inference/runtime/experts.py). `tracer`: each replay is traced as a pass (the capture records nothing).
        `feed`: how a prompt fills the cache and gives its last logits (default `feed_prompt_static`); a streamed
        model's feeds the chunks its plan sizes."""
        self.model = model  # transformers' model, its units all on `device` (or routed experts read in place)
        self.device = device
        self._before_replay = before_replay
        self._tracer = tracer
        self.layers = layers
        self._feed = feed or (lambda kv, input_ids: feed_prompt_static(model, kv, input_ids))
        # a whole step's graph is kept across calls of similar lengths; a streamed model's buffers are sized closer
        # to the call (its KV cache shares the device budget with streamed layers), its layers' graphs recorded anew
        self._round_tokens = ROUND_TOKENS if layers is None else LAYER_ROUND_TOKENS
        self._shape: tuple[int, int] | None = None  # (rows, buffer tokens) of the buffers and graph
        self._kv: StaticKV | None = None
        self._static: dict[str, torch.Tensor] = {}
        self._graph: torch.cuda.CUDAGraph | None = None
        self._capture_failed: str | None = None

    @property
    def failure(self) -> str | None:
        """Why capture failed (the calls then run eagerly), if it did."""
        return self._capture_failed

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, choose: Choose, ends: set[int],
                 pad_token_id: int, streamer: Any, on_token: Callable[[], None]) -> tuple[torch.Tensor, GraphStats]:
        """Up to `max_new_tokens` after `input_ids` (rows, n), as transformers' generate returns them: a row that
        ends early is padded with `pad_token_id` until every row has ended. `on_token` is called as each token is
        chosen (the first ends prefill)."""
        rows, prompt = input_ids.shape
        self._prepare(rows, prompt + max_new_tokens)
        if self.layers is not None:
            self.layers.new_call()
        stats = GraphStats()
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits = self._prefill(input_ids)
        out, finished = [input_ids], torch.zeros(rows, dtype=torch.bool, device=self.device)
        ends_t = torch.tensor(sorted(ends), dtype=torch.long, device=self.device)
        readback = _Readback(rows, self.device)
        for step in range(max_new_tokens):
            start_s = time.perf_counter()
            if step:
                ahead = readback.ahead()
                if not ahead:
                    if readback.emit(streamer, on_token):  # the last step's tokens: every row had ended
                        break
                    start_s = time.perf_counter()
                logits = self._step(prompt + step - 1, stats)  # reads the last step's token on the device
                readback.launch_s = time.perf_counter() - start_s
                if ahead:
                    waited_s = time.perf_counter()
                    if readback.emit(streamer, on_token):
                        break  # this step's forward is not used
                    start_s += time.perf_counter() - waited_s
            tokens = torch.where(finished, pad_token_id, choose(logits))
            self._static["ids"].copy_(tokens.view(rows, 1))
            out.append(tokens.view(rows, 1))
            finished |= torch.isin(tokens, ends_t)
            readback.start(tokens, finished)
            if step:
                stats.steps += 1
                stats.host_s += time.perf_counter() - start_s
        if readback.waiting:
            readback.emit(streamer, on_token)
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1), stats

    def _prepare(self, rows: int, tokens: int) -> None:
        """Buffers for `rows` sequences of up to `tokens` (rounded up); a graph of another shape is let go."""
        capacity = -(-tokens // self._round_tokens) * self._round_tokens
        if self._shape is not None and self._shape[0] == rows and self._shape[1] >= tokens:
            return
        self._graph, self._kv, self._static = None, None, {}  # the old graph's memory pool goes with it
        self._shape = (rows, capacity)
        self._kv = StaticKV(capacity)
        self._static = {"ids": torch.zeros(rows, 1, dtype=torch.long, device=self.device),
                        "position": torch.zeros(1, dtype=torch.long, device=self.device),
                        "keys": torch.arange(capacity, device=self.device)}
        if self.layers is not None:
            self.layers.reset(stable=self._static.values())

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed the prompt in chunks into the static cache; the last position's logits (rows, vocab), float32."""
        logits = self._feed(self._kv, input_ids)  # type: ignore[arg-type]
        self._kv.write_at = self._static["position"]  # type: ignore[union-attr]
        return logits

    def _step(self, position: int, stats: GraphStats) -> torch.Tensor:
        """The forward of the tokens in the `ids` buffer at `position`: replayed, or run eagerly and captured."""
        self._static["position"].fill_(position)
        self._kv.length = position + 1  # type: ignore[union-attr]
        if self.layers is not None:  # eager, the resident layers replayed
            with self.layers.installed():
                self._forward()
            return self._static["logits"]
        if self._graph is not None:
            if self._before_replay is not None:
                self._before_replay()
            if self._tracer is None:
                self._graph.replay()
            else:
                start, index = self._tracer.stamp(), self._tracer.begin_pass()
                self._graph.replay()
                self._tracer.span(PASSES, f"pass {index} (graph replay)", start, self._tracer.stamp(), index=index,
                                  tokens=self._shape[0], graph=True)  # type: ignore[index]
            return self._static["logits"]
        self._forward()
        if self._capture_failed is None and self.device.type == "cuda":  # elsewhere (tests) the loop runs eagerly
            start_s = time.perf_counter()
            self._capture()
            stats.capture_s += time.perf_counter() - start_s
        return self._static["logits"]

    def _forward(self) -> None:
        """The step: its bias from the position, the model's forward, the logits kept as float32."""
        static = self._static
        position = static["position"]
        rows = self._shape[0]  # type: ignore[index]
        bias = causal_bias(position, static["keys"], self.model.dtype).expand(rows, -1, -1, -1)
        out = self.model(input_ids=static["ids"], position_ids=position.expand(rows, 1),
                         cache_position=position, attention_mask=bias, past_key_values=self._kv, use_cache=True)
        static["logits"] = out.logits[:, -1, :].float()

    def _capture(self) -> None:
        """Record the step (right after an eager one warmed it up); the first replay gives this step's logits again.
        A failure is kept and the calls run eagerly from then on."""
        muted = self._tracer.muted() if self._tracer is not None else None
        self._graph, self._capture_failed = record_graph(self._forward, self.device, muted=muted)
        if self._capture_failed is not None:
            log.warning("decode steps not graphed: CUDA graph capture failed (%s)", self._capture_failed)
