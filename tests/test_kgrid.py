"""The one k-grid grammar (dtd_ray.core.kgrid), as the sweep's ``k`` and decompose's ``k1`` read it."""

import numpy as np
import pytest

from dtd_ray.core.kgrid import parse_k_grid


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, [1, 2, 3, 4, 5, 6]), (3, [3]), ("2..5", [2, 3, 4, 5]), ("1..6:2", [1, 3, 5]), ("5,1,5", [1, 5]),
        ((2, 4), [2, 4]), ([5, 1, 5], [1, 5]), ("1..3,6", [1, 2, 3, 6]), (np.int64(4), [4]), (["2..3", 5], [2, 3, 5]),
    ],
)
def test_parse_k_grid_with_kmax(spec, expected):
    assert parse_k_grid(spec, kmax=6) == expected


def test_parse_k_grid_without_kmax():
    assert parse_k_grid("1..10,20") == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20]
    assert parse_k_grid("5..20:5") == [5, 10, 15, 20]
    assert parse_k_grid("5..100:5")[-1] == 100
    assert parse_k_grid("5,10") == [5, 10]


@pytest.mark.parametrize("spec", [0, "7", "3..2", "a..b", "1-4", [], "0", "1..5:0", True, 2.5, "1..4,"])
def test_parse_k_grid_rejects(spec):
    if spec == "1..4,":  # a trailing comma is harmless
        assert parse_k_grid(spec, kmax=6) == [1, 2, 3, 4]
        return
    with pytest.raises(ValueError):
        parse_k_grid(spec, kmax=6)


def test_parse_k_grid_messages_name_the_option():
    with pytest.raises(ValueError, match=r"^k1=20 exceeds the records' kmax=8 \(the top-k lists are that long\)$"):
        parse_k_grid("1..20", kmax=8, name="k1")
    with pytest.raises(ValueError, match=r"^k1=0 is not ≥ 1$"):
        parse_k_grid("0..4", name="k1")
    with pytest.raises(ValueError, match=r"^k1 grid '5\.\.2': need lo ≤ hi and step ≥ 1$"):
        parse_k_grid("5..2", name="k1")
    with pytest.raises(ValueError, match=r"^the k grid is empty$"):
        parse_k_grid(None)
