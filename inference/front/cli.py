"""The `tierstore` command: generate, serve, plan, convert, eval, plot, probe, cache. Each subcommand parses, then
calls the library."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from typing import Any

from ...budget import Budget
from ...config import COMPRESSION_FORMATS
from ...errors import InputError, TierstoreError
from ..devices import DTYPES


class _Help(argparse.HelpFormatter):
    """Help that shows each option's default where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text and text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but bad input is one line and exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)
        # argparse takes only plain negative numbers as values; `--vram -1GB` would be "expected one argument"
        # instead of the budget's own message. No option of ours starts with a digit.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"tierstore: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _verbose_arg(parser: argparse.ArgumentParser, default: Any = False) -> None:
    """-v before or after the subcommand (a subcommand's own leaves the main one's value unless given)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log each step: resolving, converting, planning, loading, generating")


def _budget_args(parser: argparse.ArgumentParser, draft: bool = True, compress: bool = True) -> None:
    parser.add_argument("--vram", help="device tier budget, e.g. 4GB (default: measured)")
    parser.add_argument("--ram", help="host tier budget, e.g. 16GB (default: measured)")
    parser.add_argument("--config", help="TOML config file")
    # eval refuses --compress in one line (it measures --formats); its help does not offer it
    parser.add_argument("--compress", choices=["none", *COMPRESSION_FORMATS],
                        help="store the layers' matrices compressed: nf4, int8 (bitsandbytes) or GGML's k-quants "
                             "q2_k, q3_k, q4_k, q4_k_m, q5_k, q6_k, q8_0 (sets compression.format)"
                        if compress else argparse.SUPPRESS)
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    parser.add_argument("--download", action="store_true", help="allow downloading a Hub model not in the cache")
    # serve refuses a draft in one line; its help does not offer one
    parser.add_argument("--draft", help="speculative decoding: \"ngram\" (prompt lookup) or a small model with the "
                                        "same tokenizer (path, alias, Hub id, GGUF, layer store)" if draft
                        else argparse.SUPPRESS)
    _verbose_arg(parser, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    from ... import __version__

    parser = _Parser(prog="tierstore", description="Run language models larger than GPU memory.")
    parser.add_argument("--version", action="version", version=f"tierstore {__version__}")
    _verbose_arg(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _generate_parser(sub)
    _serve_parser(sub)
    _store_parsers(sub)
    _eval_parser(sub)
    _tool_parsers(sub)
    return parser


def _generate_parser(sub: Any) -> None:
    """generate: prompts (or a file of them) through the model, then the run report."""
    gen = sub.add_parser("generate", help="generate text, then print the run report")
    gen.add_argument("model", help="model directory, GGUF file, layer store, alias (smollm2) or Hub repo id")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--prompts-file", help="a JSONL file of prompts ({\"prompt\": ..., \"id\": ...} per line), "
                                            "run in batches; needs --out")
    gen.add_argument("--out", help="with --prompts-file: the JSONL file each finished prompt is appended to; "
                                   "run again after a kill, it skips the prompts already there")
    gen.add_argument("--batch-size", type=int, help="with --prompts-file: prompts per pass (default: 8; 1 with "
                                                    "--draft)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--temperature", type=float, help="sample at this temperature")
    gen.add_argument("--top-p", type=float, help="when sampling: keep the smallest set of tokens with this mass")
    gen.add_argument("--top-k", type=int, help="when sampling: keep the k most likely tokens")
    gen.add_argument("--seed", type=int, help="random seed when sampling (default: a fresh one, printed in the "
                                              "report's notes)")
    gen.add_argument("--dtype", choices=list(DTYPES),
                     help="compute dtype (default: the checkpoint's on a GPU, float32 on a CPU)")
    gen.add_argument("--no-chat-template", action="store_true", help="send the prompt as it is")
    gen.add_argument("--report-json", help="write the report (tokens, text, tiers, timing, plan) here")
    gen.add_argument("--trace", help="write a timeline of reads, copies, compute and stalls here (Chrome trace "
                                     "JSON: open in Perfetto, or draw with tierstore plot)")
    gen.add_argument("--prefix-cache", metavar="DIR", help="keep each finished sequence's KV cache in DIR, and start "
                                                           "a later prompt that begins the same way from it")
    gen.add_argument("--tp", type=int, help="tensor parallelism: N processes, one per GPU, each streaming its "
                                            "shard of every unit under the budget of its own device (under "
                                            "torchrun: the number of processes)")
    _budget_args(gen)


def _serve_parser(sub: Any) -> None:
    """serve: the OpenAI-compatible API."""
    serve = sub.add_parser("serve", help="serve an OpenAI-compatible API (chat and text completions, streamed "
                                         "or not); many requests share each weight pass")
    serve.add_argument("model", help="model directory, GGUF file, layer store, alias (smollm2) or Hub repo id")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind")
    serve.add_argument("--api-key", default=os.environ.get("TIERSTORE_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/ (default: $TIERSTORE_API_KEY, else none)")
    serve.add_argument("--served-model-name", help="the model id clients send (default: MODEL as given)")
    serve.add_argument("--max-batch", type=int, default=32, help="most sequences per pass (the KV cache budget "
                                                                "may hold fewer of the longest)")
    serve.add_argument("--max-queue", type=int, default=256, help="most requests waiting to join; more get 429")
    serve.add_argument("--max-seq-len", type=int, default=4096, help="most tokens in a sequence (prompt and "
                                                                    "completion), at most the model's context")
    serve.add_argument("--dtype", choices=list(DTYPES),
                       help="compute dtype (default: the checkpoint's on a GPU, float32 on a CPU)")
    serve.add_argument("--prefix-cache", metavar="DIR", help="keep finished sequences' KV caches on disk in DIR too "
                                                             "(they are kept in RAM in any case), across restarts")
    _budget_args(serve, draft=False)


def _store_parsers(sub: Any) -> None:
    """plan and convert: what a model's placement and its layer store will be."""
    plan = sub.add_parser("plan", help="print the placement plan; nothing runs")
    plan.add_argument("model")
    plan.add_argument("--tp", type=int, default=1, help="the plan of each of N tensor-parallel ranks")
    _budget_args(plan)

    conv = sub.add_parser("convert", help="convert a checkpoint into a layer store")
    conv.add_argument("model")
    conv.add_argument("out_dir")
    conv.add_argument("--dtype", choices=list(DTYPES), help="store weights in this dtype")
    conv.add_argument("--compress", choices=COMPRESSION_FORMATS, help="write a compressed store (matrices in this "
                                                                  "format, the rest in --dtype)")
    conv.add_argument("--config", help="TOML config file (budget.disk caps the store's size)")
    conv.add_argument("--trust-remote-code", action="store_true")
    conv.add_argument("--eval", action="store_true", help="with --compress: measure the store against the "
                                                          "uncompressed model, as `tierstore eval` does")
    _verbose_arg(conv, argparse.SUPPRESS)


def _tool_parsers(sub: Any) -> None:
    """plot, probe and cache: the tools around a run."""

    plot = sub.add_parser("plot", help="draw one pass of a --trace file as lanes, with each link's GB/s")
    plot.add_argument("trace", help="a trace written by generate --trace")
    plot.add_argument("-o", "--output", default="timeline.png", help="the PNG to write")
    plot.add_argument("--pass", dest="pass_index", type=int, help="which pass (default: the middle one)")
    _verbose_arg(plot, argparse.SUPPRESS)

    probe = sub.add_parser("probe", help="measure bandwidths and free memory; cached for the planner")
    probe.add_argument("--config", help="TOML config file")
    _verbose_arg(probe, argparse.SUPPRESS)

    cache = sub.add_parser("cache", help="list the converted layer stores in the cache, or remove some")
    cache.add_argument("--remove", nargs="+", metavar="NAME", help="remove these stores (refused while in use)")
    cache.add_argument("--older-than", type=float, metavar="DAYS", help="remove the stores not read for DAYS days "
                                                                        "(those in use are kept)")
    cache.add_argument("--config", help="TOML config file (runtime.cache_dir says where the cache is)")
    _verbose_arg(cache, argparse.SUPPRESS)


def _eval_parser(sub: Any) -> None:
    """eval: what each compression format costs in accuracy."""
    ev = sub.add_parser("eval", help="measure what compression costs in accuracy: top-1 agreement, KL divergence "
                                     "and perplexity of each format against the uncompressed model")
    ev.add_argument("model", help="the uncompressed model (directory, GGUF file, layer store, alias or Hub id)")
    ev.add_argument("--formats", help="comma-separated formats to measure (default: "
                                      f"{','.join(COMPRESSION_FORMATS)})")
    ev.add_argument("--text", help="a UTF-8 text file to read (default: the bundled English text, ~3,400 tokens)")
    ev.add_argument("--window", type=int, default=512, help="tokens per teacher-forced pass")
    ev.add_argument("--max-tokens", type=int, help="read at most this many tokens of the text")
    ev.add_argument("--dtype", choices=list(DTYPES),
                    help="compute dtype (default: the checkpoint's on a GPU, float32 on a CPU)")
    ev.add_argument("--json", help="write the measurements here as JSON")
    _budget_args(ev, draft=False, compress=False)


def _console() -> Any:
    """A rich console; wide enough for the report's tables when the output is a file or a pipe."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def _budget(args: argparse.Namespace) -> Budget | None:
    if args.vram is None and args.ram is None:
        return None
    return Budget(vram=args.vram, ram=args.ram)


def _config(args: argparse.Namespace) -> Any:
    from ...config import Config

    config = Config.load(args.config).with_compression(args.compress)
    directory = getattr(args, "prefix_cache", None)
    if directory is None:
        return config
    directory = os.path.expanduser(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InputError(f"--prefix-cache {directory!r} is a file; give a directory")
    return dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, prefix_cache_dir=directory))


def _generate(args: argparse.Namespace) -> int:
    from .generate import GenerateRequest, run_generate

    if args.prompt is None and args.prompts_file is None:
        raise InputError("give --prompt (one or more) or --prompts-file")
    if args.prompt is not None and args.prompts_file is not None:
        raise InputError("give --prompt or --prompts-file, not both")
    if (args.prompts_file is None) != (args.out is None) or (args.batch_size is not None and not args.prompts_file):
        raise InputError("--prompts-file and --out go together (and --batch-size with them)")
    if args.report_json:
        from ...files import check_writable
        check_writable(args.report_json, "--report-json file")
    tensor_parallel, launch = _tensor_parallel(args)
    if launch:
        from .launch import check_launch, run_ranks
        check_launch(args.model, tensor_parallel, _config(args), args.trust_remote_code, args.download)
        return run_ranks(args.argv, tensor_parallel)
    console = _console()
    request = GenerateRequest(model=args.model, prompts=args.prompt or [], max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                              chat_template=not args.no_chat_template, budget=_budget(args), config=_config(args),
                              trust_remote_code=args.trust_remote_code, allow_download=args.download,
                              draft=args.draft, trace=args.trace, dtype=args.dtype, tensor_parallel=tensor_parallel)
    if args.prompts_file:
        return _generate_file(args, request, console)
    stream = (lambda text: console.print(text, end="", markup=False, highlight=False)) \
        if len(args.prompt) == 1 else None
    result = run_generate(request, on_text=stream)
    if stream is None:
        for index, text in enumerate(result["text"]):
            console.print(f"[bold][{index}][/bold] {text}", markup=True, highlight=False)
    else:
        console.print()
    console.print(result["report"])
    if args.report_json and _rank() == 0:
        from ...files import write_atomic
        data = {key: value for key, value in result.items() if key != "report"}
        write_atomic(args.report_json, json.dumps(data, indent=1).encode())
    return 0


def _tensor_parallel(args: argparse.Namespace) -> tuple[int, bool]:
    """The ranks this run has, and whether this process is to launch them (or is one of them, or runs alone)."""
    from ..runtime.collectives import launched_world

    world = launched_world()
    if world is not None and args.tp is not None and args.tp != world:
        raise InputError(f"--tp {args.tp}, but {world} processes were launched (WORLD_SIZE)")
    ranks = world if world is not None else args.tp if args.tp is not None else 1
    if ranks < 1:
        raise InputError(f"--tp must be at least 1, got {ranks}")
    for option, given in (("--prompts-file", args.prompts_file), ("--draft", args.draft), ("--trace", args.trace)):
        if ranks > 1 and given:
            raise InputError(f"--tp runs one prompt or a batch of --prompt; {option} does not combine with it yet")
    return ranks, world is None and ranks > 1


def _rank() -> int:
    """This process's rank among launched ranks (0 when there are none)."""
    return int(os.environ.get("RANK", "0"))


def _generate_file(args: argparse.Namespace, request: Any, console: Any) -> int:
    """--prompts-file: batches with a progress bar (on a terminal), then a summary line and the last report."""
    from rich.progress import Progress

    from .generate import run_prompts_file

    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("prompts", total=None)

        def advance(finished: int, pending: int) -> None:
            bar.update(task, total=pending, advance=finished)

        result = run_prompts_file(request, args.prompts_file, args.out, args.batch_size, on_progress=advance)
    if result["report"] is not None:
        console.print(result["report"])
    rate = result["new_tokens"] / result["seconds"] if result["seconds"] > 0 else 0.0
    console.print(f"{result['generated']} prompts generated ({result['skipped']} already in {args.out}), batch "
                  f"{result['batch_size']}: {result['new_tokens']} tokens in {result['seconds']:.1f} s, "
                  f"{rate:.1f} tokens/s", markup=False, highlight=False)
    if args.report_json:
        from ...files import write_atomic
        data = {**{key: value for key, value in result.items() if key != "report"},
                "last_batch": result["report"].to_dict() if result["report"] is not None else None}
        write_atomic(args.report_json, json.dumps(data, indent=1).encode())
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM (exit 0) or Ctrl-C (130); the start-up lines go to stderr."""
    try:
        from .server import ServeOptions, serve
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastapi", "uvicorn", "pydantic", "starlette"):
            raise
        raise InputError("tierstore serve needs FastAPI and uvicorn: pip install 'tierstore[serve]'") from exc
    from .generate import GenerateRequest

    request = GenerateRequest(model=args.model, prompts=[], budget=_budget(args), config=_config(args),
                              trust_remote_code=args.trust_remote_code, allow_download=args.download,
                              dtype=args.dtype, draft=args.draft)
    options = ServeOptions(host=args.host, port=args.port, api_key=args.api_key,
                           served_model_name=args.served_model_name, max_batch=args.max_batch,
                           max_queue=args.max_queue, max_seq_len=args.max_seq_len)
    serve(request, options, say=lambda line: print(f"tierstore: {line}", file=sys.stderr, flush=True))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from ...report import plan_table
    from ..compose import make_plan_for

    if args.tp < 1:
        raise InputError(f"--tp must be at least 1, got {args.tp}")
    _console().print(plan_table(make_plan_for(args.model, _budget(args), _config(args), args.trust_remote_code,
                                             args.download, draft=args.draft, tensor_parallel=args.tp)))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..compose import convert_model

    if args.eval and not args.compress:
        raise InputError("--eval measures a compressed store against the model: give --compress too")
    out = convert_model(args.model, args.out_dir, dtype=args.dtype, compress=args.compress, config=args.config,
                        trust_remote_code=args.trust_remote_code)
    print(f"layer store written to {out}")
    if args.eval:
        from ...config import Config
        from .quality import Candidate, QualityRequest, measure_quality

        config = Config.load(args.config)
        request = QualityRequest(model=args.model, candidates=[Candidate(args.compress, out, config)], config=config,
                                 trust_remote_code=args.trust_remote_code)
        _print_quality(measure_quality(request), None)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ...config import Config
    from .quality import Candidate, QualityRequest, measure_quality

    formats = args.formats.split(",") if args.formats else list(COMPRESSION_FORMATS)
    for name in formats:
        if name not in ("none", *COMPRESSION_FORMATS):
            raise InputError(f"--formats: {name!r} is not a format; choose from none, {', '.join(COMPRESSION_FORMATS)}")
    if args.compress not in (None, "none"):
        raise InputError("eval measures --formats against the uncompressed model; --compress does not apply")
    if args.json:
        from ...files import check_writable
        check_writable(args.json, "--json file")
    config = Config.load(args.config)
    request = QualityRequest(model=args.model, config=config, text_path=args.text, budget=_budget(args),
                             window_tokens=args.window, max_tokens=args.max_tokens, dtype=args.dtype,
                             trust_remote_code=args.trust_remote_code, allow_download=args.download,
                             candidates=[Candidate(_format_label(name, config), args.model,
                                                   _candidate_config(config, name)) for name in formats])
    _print_quality(measure_quality(request, on_progress=lambda line: print(f"tierstore: {line}", file=sys.stderr)),
                   args.json)
    return 0


def _candidate_config(config: Any, name: str) -> Any:
    """eval's config for format `name`: a calibration text (and its rounding) applies to the GGML formats alone,
    so a list of formats can mix them with nf4 and int8."""
    from ...compression import ggml_recipe

    fitted = config.with_compression(name)
    return fitted if ggml_recipe(name) else fitted.data_free()


def _format_label(name: str, config: Any) -> str:
    """A format's row in the eval table: mixed formats say their bits, a GGML recipe fitted to a calibration text
    says how (+imatrix, +gptq), and a rotated one says so (+rot)."""
    from ...compression import GPTQ, MIXED, ggml_recipe
    from ...rotation import HADAMARD

    label = f"{MIXED}{config.compression.bits:g}" if name == MIXED else name
    if not ggml_recipe(name):
        return label
    if config.compression.calibration:
        label += f"+{'gptq' if config.compression.rounding == GPTQ else 'imatrix'}"
    return label + ("+rot" if config.compression.rotation == HADAMARD else "")


def _print_quality(result: dict[str, Any], json_path: str | None) -> None:
    """The eval table, and the JSON file when asked."""
    from rich.table import Table

    first = result["formats"][0]
    table = Table(title=f"tierstore eval: {result['model']}, {first['tokens']} tokens of {result['text']}, "
                        f"reference perplexity {first['reference_perplexity']:.3f}")
    for column in ("format", "bits/weight", "top-1 agreement", "KL mean", "KL p99", "perplexity", "change"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for row in result["formats"]:
        bits = "as stored" if row["bits_per_weight"] is None else f"{row['bits_per_weight']:.3f}"
        table.add_row(row["format"], bits, f"{100 * row['top1_agreement']:.2f}%", f"{row['kl_mean']:.4f}",
                      f"{row['kl_p99']:.4f}", f"{row['perplexity']:.3f}", f"{100 * row['perplexity_change']:+.2f}%")
    _console().print(table)
    if json_path:
        from ...files import write_atomic
        write_atomic(json_path, json.dumps(result, indent=1).encode())


def _plot(args: argparse.Namespace) -> int:
    from ...files import check_writable
    from ...plot import plot_trace

    check_writable(args.output, "plot file")
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise InputError("tierstore plot needs matplotlib: pip install 'tierstore[plot]'") from exc
    print(plot_trace(args.trace, args.output, args.pass_index))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ...config import Config
    from ...probe import run_probe
    from ...sizes import format_size
    from ..devices import compute_device

    config = Config.load(args.config)
    result = run_probe(config.runtime.cache_dir, compute_device(config.runtime.device),
                       reader_threads=config.io.reader_threads)
    table = Table(title="tierstore probe")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in result.items():
        table.add_row(name, format_size(int(value)) if name.endswith("bytes") else
                      str(int(value)) if name.endswith("threads") else f"{value:.2f}")
    _console().print(table)
    return 0


def _cache(args: argparse.Namespace) -> int:
    """List the cache's stores, or remove some and say which."""
    from rich.table import Table

    from ...config import Config
    from ...sizes import format_size
    from ..loading.cache import list_stores, remove_stores

    cache_dir = Config.load(args.config).runtime.cache_dir
    if args.remove or args.older_than is not None:
        removed = remove_stores(cache_dir, args.remove, args.older_than)
        freed = sum(store.nbytes for store in removed)
        print(f"removed {len(removed)} stores from {cache_dir}, {format_size(freed)} freed"
              + "".join(f"\n  {store.name}" for store in removed))
        return 0
    stores = list_stores(cache_dir)
    table = Table(title=f"tierstore cache: {cache_dir}")
    for column in ("store", "size", "format", "last read", "in use", "converted from"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold")
    for store in stores:
        table.add_row(store.name, format_size(store.nbytes), store.format,
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(store.last_read_s)),
                      "yes" if store.in_use else "", store.source)
    _console().print(table)
    print(f"{len(stores)} stores, {format_size(sum(store.nbytes for store in stores))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; 0 ok, 2 bad input (one line), 1 internal error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])  # what `--tp` starts each rank with
    if _rank() != 0:  # one of several ranks: rank 0 speaks for all of them
        sys.stdout = open(os.devnull, "w")
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="tierstore: %(message)s")
    if not args.verbose:  # transformers' advice about tokenizers and generation flags is noise for a CLI user
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    handler = {"generate": _generate, "serve": _serve, "plan": _plan, "convert": _convert, "plot": _plot,
               "probe": _probe, "cache": _cache, "eval": _eval}[args.command]
    try:
        return handler(args)
    except TierstoreError as exc:
        if os.environ.get("TIERSTORE_DEBUG"):
            raise
        print(f"tierstore: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tierstore: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: keep the traceback for the bug report
        if os.environ.get("TIERSTORE_DEBUG"):
            raise
        print(f"tierstore: internal error: {type(exc).__name__}: {_one_line(exc)} (set TIERSTORE_DEBUG=1 for the "
              f"traceback)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """An error's message on one line (messages from other libraries may span several)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
