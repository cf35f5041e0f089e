"""The one pairing table (vfioproxy.protocol.pairing.Outstanding)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from vfioproxy.protocol.pairing import Outstanding


def test_a_reused_id_is_answered_first_sent_first():
    table: Outstanding[str] = Outstanding()
    table.add(7, "first")
    table.add(8, "other")
    table.add(7, "second")
    assert len(table) == 3 and table.first(7) == "first"
    assert table.take(7) == "first"
    assert table.take(7) == "second"
    assert table.take(7) is None
    assert list(table) == ["other"]


def test_the_limit_forgets_the_oldest_of_all_and_says_which():
    table: Outstanding[str] = Outstanding(3)
    for msg_id, item in ((1, "a"), (2, "b"), (1, "c")):
        assert table.add(msg_id, item) is None
    assert table.take(2) == "b"
    assert table.add(3, "d") is None  # "b" was answered: room for one more
    assert table.add(4, "e") == "a"  # the oldest still waiting
    assert sorted(table) == ["c", "d", "e"] and len(table) == 3
    assert table.take(1) == "c"


def test_per_id_bounds_one_id_and_take_can_match():
    table: Outstanding[tuple[str, int]] = Outstanding(per_id=2)
    table.add(5, ("read", 1))
    table.add(5, ("write", 2))
    assert table.add(5, ("read", 3)) == ("read", 1)
    assert table.take(5, lambda item: item[0] == "read") == ("read", 3)
    assert table.take(5, lambda item: item[0] == "read") is None
    table.discard(5, tuple(["write", 2]))  # equal, not the same object: stays
    assert len(table) == 1
    (item,) = table
    table.discard(5, item)
    assert len(table) == 0 and table.clear() == []


def test_bounds_below_one_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        Outstanding(0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=200),
       st.integers(1, 8))
def test_it_behaves_as_the_list_of_what_waits(ops, limit):
    """Against a model: the waiting items in the order added."""
    table: Outstanding[int] = Outstanding(limit)
    model: list[tuple[int, int]] = []
    for serial, (adding, msg_id) in enumerate(ops):
        if adding:
            forgotten = table.add(msg_id, serial)
            expected = model.pop(0)[1] if len(model) >= limit else None
            model.append((msg_id, serial))
            assert forgotten == expected
        else:
            taken = table.take(msg_id)
            first = next((entry for entry in model if entry[0] == msg_id), None)
            if first is not None:
                model.remove(first)
            assert taken == (None if first is None else first[1])
        assert len(table) == len(model)
        assert sorted(table) == sorted(item for _, item in model)
