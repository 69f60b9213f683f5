import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierstore import Config, ConfigError
from tierstore.config import SCHEMA


def test_defaults_and_overrides():
    config = Config.load({"budget": {"vram": "4GB"}, "policy": {"device": "belady", "prefetch_depth": 3}})
    assert config.budget.vram == 4 * 10**9 and config.budget.ram is None
    assert config.policy.device == "belady" and config.policy.prefetch_depth == 3
    assert Config.load(None).io.reader_threads == 4


def test_toml_file(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[budget]\nram = "16GB"\n[io]\nreader_threads = 2\ndirect_io = false\n')
    config = Config.load(str(path))
    assert config.budget.ram == 16 * 10**9 and config.io.reader_threads == 2 and config.io.direct_io is False


@pytest.mark.parametrize("data, words", [
    ({"budget": {"vrm": "4GB"}}, ["budget.vrm", "vram"]),
    ({"polcy": {}}, ["polcy"]),
    ({"policy": {"device": "random"}}, ["policy.device", "'random'", "lru"]),
    ({"policy": {"prefetch_depth": -1}}, ["policy.prefetch_depth", "-1"]),
    ({"io": {"reader_threads": "4"}}, ["io.reader_threads", "'4'"]),
    ({"io": {"pinned_memory": "yes"}}, ["io.pinned_memory"]),
    ({"budget": {"ram": "lots"}}, ["budget.ram", "lots"]),
    ({"runtime": {"device": "tpu"}}, ["runtime.device", "tpu"]),
    ({"policy": 3}, ["[policy]"]),
])
def test_bad_values_name_key_value_and_choices(data, words):
    with pytest.raises(ConfigError) as info:
        Config.load(data)
    for word in words:
        assert word in str(info.value)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[budget]\nvram = "4GB"\nram = \n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*line 3"):
        Config.load(str(path))


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load("/nonexistent/tierstore.toml")


def test_frozen():
    config = Config.load({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.io.reader_threads = 9  # type: ignore[misc]


def test_every_key_is_documented_in_readme():
    readme = open("README.md", encoding="utf-8").read()
    for section, keys in SCHEMA.items():
        for key in keys:
            assert f"`{section}.{key}`" in readme, f"{section}.{key} missing from README"


_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text()),
                       lambda inner: st.one_of(st.lists(inner), st.dictionaries(st.text(), inner)), max_leaves=8)


@settings(deadline=None)  # what is tested is the error's type: a loaded machine must not fail it on time
@given(st.dictionaries(st.sampled_from([*SCHEMA, "x"]),
                       st.one_of(_values, st.dictionaries(st.sampled_from(
                           [k for keys in SCHEMA.values() for k in keys] + ["y"]), _values))))
def test_random_dicts_raise_only_config_error(data):
    try:
        Config.from_dict(data)
    except ConfigError:
        pass
