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


def test_shares_of_m_round_half_up_and_are_at_least_one():
    from dtd_ray.core.kgrid import k_of_share, k_shares

    # k = max(1, floor(p·m/100 + 1/2)): the cifar10_zoo preset's widths
    assert [k_of_share(p, m=64) for p in (1, 2, 5, 10)] == [1, 1, 3, 6]
    assert [k_of_share(p, m=448) for p in (1, 2, 5, 10)] == [4, 9, 22, 45]
    assert [k_of_share(p, m=1024) for p in (1, 2, 5, 10)] == [10, 20, 51, 102]
    assert k_of_share(2.5, m=20) == 1 and k_of_share(7.5, m=20) == 2  # 0.5 and 1.5 round up
    assert parse_k_grid("1..3,5%,10%", m=480) == [1, 2, 3, 24, 48]
    assert parse_k_grid([2, "5%"], m=64) == [2, 3]  # a share may land on a count: one k
    assert k_shares("1..10,20,1%,2.5%") == [1.0, 2.5] and k_shares("1..10") == [] and k_shares(None) == []


def test_a_share_needs_m_and_a_valid_percentage():
    with pytest.raises(ValueError, match=r"^k grid '1\.\.5,5%' has a share of the feature width m \(5%\), "
                                         r"which resolves only where m is known$"):
        parse_k_grid("1..5,5%")
    for bad in ("0%", "101%", "5%%", "%", "-5%"):
        with pytest.raises(ValueError, match="grid part"):
            parse_k_grid(bad, m=64)
    with pytest.raises(ValueError, match=r"^k=102 exceeds the records' kmax=64"):
        parse_k_grid("10%", m=1024, kmax=64)
