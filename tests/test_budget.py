import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierstore import Budget, BudgetError, format_size, parse_size


@pytest.mark.parametrize("text, nbytes", [
    ("4GB", 4 * 10**9), ("4 GB", 4 * 10**9), ("4GiB", 4 * 2**30), ("512MB", 512 * 10**6),
    ("0.5GB", 5 * 10**8), ("1.5TiB", int(1.5 * 2**40)), ("4gb", 4 * 10**9), ("16 gib", 16 * 2**30),
    (1024, 1024), ("1024", 1024), ("0", 0), ("3KiB", 3072),
])
def test_sizes_parse(text, nbytes):
    assert parse_size(text, "x") == nbytes


@pytest.mark.parametrize("bad", ["-1GB", "nan", "inf", "", "   ", "4GX", "lots", True, False, -5, float("nan"),
                                 float("inf"), 1.5, [], "4 G B", "1e400GB"])
def test_bad_sizes_name_the_field(bad):
    with pytest.raises(BudgetError, match="budget.vram"):
        Budget(vram=bad)


def test_budget_error_is_value_error():
    assert issubclass(BudgetError, ValueError)


def test_str_reads_like_the_user_wrote_it():
    assert str(Budget(vram="4GB", ram="16GB")) == "Budget(vram=4GB, ram=16GB)"
    assert str(Budget(vram="4GiB")) == "Budget(vram=4GiB)"
    assert format_size(1536 * 10**6) == "1536MB"
    assert format_size(1_234_567_890) == "1.23GB"
    assert format_size(None) == "unlimited"


def test_measure_reports_this_machine(tmp_path):
    measured = Budget.measure(tmp_path)
    assert measured.vram is not None and measured.vram >= 0
    assert measured.ram > 0 and measured.disk > 0


@given(st.one_of(st.text(), st.integers(), st.floats(), st.booleans(), st.none(),
                 st.lists(st.integers()), st.dictionaries(st.text(), st.integers())))
def test_random_input_raises_only_budget_error(value):
    try:
        nbytes = parse_size(value, "budget.ram")
    except BudgetError:
        return
    assert isinstance(nbytes, int) and nbytes >= 0 and not math.isnan(nbytes)
