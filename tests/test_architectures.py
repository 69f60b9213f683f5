"""Every decoder-only architecture in transformers' causal-LM auto mapping that builds tiny from its config class:
streamed by tierstore, it must give transformers' own greedy tokens, or be refused with a clear TierstoreError.

The sweep prints N/M and names every architecture it skipped, with the reason (encoder-decoder, too large when
shrunk, transformers itself cannot build or run the tiny config). Run it alone, with its table:
    python -m pytest -q -s tests/test_architectures.py
"""
import os
import shutil
import warnings

import pytest
import torch

import tierstore

SHRINK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, head_dim=16, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, num_experts=4, num_local_experts=4, n_routed_experts=4,
              num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
              # multi-head latent attention (DeepSeek-style): its own head sizes
              kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
ALWAYS = ("hidden_size", "num_hidden_layers", "vocab_size")  # set even where the config names them otherwise
MAX_PARAMETERS = 30_000_000
PROMPT = torch.tensor([[5, 9, 33, 7, 81]])
NEW_TOKENS = 5


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny(model_type: str, **overrides):
    """(model, None) for a tiny random-weight model of `model_type` (its text config's `overrides` set), or (None,
    why it was skipped)."""
    from accelerate import init_empty_weights
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    try:
        config = _shrunk_config(CONFIG_MAPPING[model_type])
        for key, value in overrides.items():
            setattr(config.get_text_config(), key, value)
        if getattr(config, "is_encoder_decoder", False):
            return None, "encoder-decoder"
        with init_empty_weights():
            count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if count > MAX_PARAMETERS:
            return None, f"{count / 1e6:.0f}M parameters when shrunk"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the tiny config does not build
        return None, f"does not build tiny: {type(exc).__name__}: {_first_line(exc)}"
    with torch.no_grad():  # larger-than-init weights, so that greedy tokens depend on every layer
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(4.0)
    return model, None


def _shrunk_config(config_class):
    """The config built small: through its constructor where it takes the sizes (so that what it derives from them,
    such as per-layer types, agrees), else by setting them on the default config."""
    import inspect

    config = config_class()
    text = config.get_text_config()
    accepted = set(inspect.signature(type(text).__init__).parameters) | {f for f in getattr(text, "__dataclass_fields__", {})}
    sizes = {key: value for key, value in SHRINK.items() if key in accepted and hasattr(text, key)}
    try:
        small = type(text)(**sizes)
        if text is config:
            config = small
        else:
            config = config_class(text_config=small.to_dict())
        text = config.get_text_config()
    except Exception:  # noqa: BLE001 - not through the constructor: set what can be set
        pass
    for key, value in SHRINK.items():
        if hasattr(text, key) or key in ALWAYS:
            try:
                setattr(text, key, value)
            except (AttributeError, TypeError, ValueError):
                continue  # a derived property: the constructor set it, or it stays as it is
    return config


def sweep_one(model_type: str, root: str) -> tuple[str, str]:
    """(outcome, detail): pass, refused (a TierstoreError), skipped, wrong tokens, or error."""
    from transformers import AutoConfig

    model, why = tiny(model_type)
    if model is None:
        return "skipped", why
    try:
        want = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
    except Exception as exc:  # noqa: BLE001
        return "skipped", f"transformers' own generate fails: {type(exc).__name__}: {_first_line(exc)}"
    directory = os.path.join(root, model_type)
    try:
        model.save_pretrained(directory)
        AutoConfig.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001
        shutil.rmtree(directory, ignore_errors=True)
        return "skipped", f"transformers cannot reload its own tiny config: {type(exc).__name__}: {_first_line(exc)}"
    try:
        config = {"runtime": {"cache_dir": os.path.join(root, "cache"), "device": "cpu"}}
        with tierstore.AutoModel.from_pretrained(directory, config=config) as whole:
            layouts = {**whole.store.layouts, **(whole.experts.store.layouts if whole.experts else {})}
            sizes = sorted(layout.nbytes for layout in layouts.values())
        largest, rest = sizes[-1], sum(sizes[:-1])
        budget = tierstore.Budget(vram=largest + rest // 3, ram=largest + rest // 2)  # some units stream
        with tierstore.AutoModel.from_pretrained(directory, budget=budget, config=config) as streamed:
            got = streamed.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0).tolist()
            regime = streamed.plan.regime
    except tierstore.TierstoreError as exc:
        return "refused", f"{type(exc).__name__}: {_first_line(exc)}"
    except Exception as exc:  # noqa: BLE001
        return "error", f"{type(exc).__name__}: {_first_line(exc)}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return ("pass", regime) if got == want else ("wrong tokens", f"{regime}: {got} != {want}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:160]


def test_every_buildable_architecture_matches_transformers_or_is_refused(tmp_path):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in causal_lm_types():
            results[model_type] = sweep_one(model_type, str(tmp_path))
    ran = {k: v for k, v in results.items() if v[0] != "skipped"}
    passed = [k for k, v in ran.items() if v[0] == "pass"]
    print(f"\narchitectures: {len(passed)}/{len(ran)} built tiny give transformers' tokens streamed; "
          f"{len(results) - len(ran)} of {len(results)} skipped")
    for outcome in ("refused", "wrong tokens", "error", "skipped"):
        for model_type, (got, detail) in results.items():
            if got == outcome:
                print(f"  {outcome:12} {model_type:28} {detail}")
    bad = {k: v for k, v in ran.items() if v[0] in ("wrong tokens", "error")}
    assert not bad, f"{len(bad)} architectures gave wrong tokens or an unclear error: {bad}"
    assert len(passed) >= 60  # the sweep itself works: most architectures run


def test_attention_is_the_architectures_own_unless_named(tmp_path):
    """gemma2 has no SDPA in transformers: by default it runs eager; asked for sdpa, it is refused by name."""
    model, why = tiny("gemma2")
    if model is None:
        pytest.skip(why)
    model.save_pretrained(tmp_path / "gemma2")
    config = {"runtime": {"cache_dir": str(tmp_path / "cache")}}
    with tierstore.AutoModel.from_pretrained(str(tmp_path / "gemma2"), config=config) as streamed:
        assert streamed.model.config._attn_implementation == "eager"
        assert any("attention: eager" in note for note in streamed.plan.notes)
    with pytest.raises(tierstore.ConfigError, match=r"runtime.attention = 'sdpa': Gemma2ForCausalLM .* supports eager"):
        tierstore.AutoModel.from_pretrained(str(tmp_path / "gemma2"),
                                            config={"runtime": {**config["runtime"], "attention": "sdpa"}})
