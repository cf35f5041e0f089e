"""``irq`` rules: their syntax, and the injector's decisions on interrupts."""

from __future__ import annotations

import pytest

from vfioproxy.inject import (
    Injector,
    RuleSyntaxError,
    loads_rules,
    parse_rule,
    rule_from_dict,
)
from vfioproxy.side import Direction

MSIX, INTX = 2, 0


@pytest.mark.parametrize("text, canonical", [
    ("irq MSIX[0] delay fixed(100us)", "irq MSIX[0] delay fixed(100us)"),
    ("IRQ * p=0.01 drop", "irq * p=0.01 drop"),
    ("irq msix,intx[0] session=1 index=3.. id=4 drop",
     "irq INTX[0],MSIX session=1 index=3.. id=4 drop"),
    ("irq IRQ7[2] delay uniform(1us,2us)", "irq IRQ7[2] delay uniform(1us,2us)"),
])
def test_irq_rules_round_trip(text: str, canonical: str) -> None:
    rule = parse_rule(text)
    assert rule.to_text() == canonical
    assert parse_rule(canonical) == rule
    assert rule_from_dict(rule.to_dict()) == rule


@pytest.mark.parametrize("text, token, message", [
    ("irq MSIX[0] error EINVAL", "error", "delay or drop"),
    ("irq MSIX[0] stall 1ms", "stall", "delay or drop"),
    ("irq FOO drop", "FOO", "unknown IRQ"),
    ("irq MSIX[x] drop", "x", "IRQ vector"),
    ("irq MSIX[0 drop", "MSIX[0", "MSIX[3]"),
    ("irq MSIX[0] request drop", "request", "only session="),
    ("irq MSIX[0] region=0 drop", "region=0", "only session="),
    ("irq", None, "missing IRQ vectors"),
])
def test_bad_irq_rules_name_what_is_wrong(text: str, token: str | None, message: str) -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule(text)
    assert message in str(caught.value)
    if token is not None:
        assert repr(token) in str(caught.value)


def test_irq_rules_in_a_file() -> None:
    rules = loads_rules('[[rule]]\ndirection = "irq"\nvectors = ["MSIX[1]"]\naction = "drop"\n'
                        '[[rule]]\nrule = "irq * delay fixed(1ms)"\n')
    assert [r.to_text() for r in rules] == ["irq MSIX[1] drop", "irq * delay fixed(1ms)"]
    with pytest.raises(RuleSyntaxError, match="vectors"):
        loads_rules('[[rule]]\ndirection = "c2s"\nvectors = ["MSIX[1]"]\naction = "drop"\n')


def test_irq_rules_match_no_message_and_message_rules_no_irq() -> None:
    injector = Injector(["irq * drop", "c2s * delay fixed(1ms)"])
    decision = injector.decide(1, Direction.C2S, b"\0" * 16, 0.0)
    assert [a.rule_id for a in decision.applied] == [2]
    assert injector.decide(1, Direction.S2C, b"\0" * 16, 0.0).applied == ()
    irq = injector.irq(1, MSIX, 0, 0.0)
    assert irq is not None and irq.drop and [a.rule_id for a in irq.applied] == [1]
    assert Injector(["c2s * drop"]).irq(1, MSIX, 0, 0.0) is None


def test_vectors_index_and_session_filters() -> None:
    injector = Injector(["irq MSIX[1] session=2 index=1..3 delay fixed(1ms)", "irq INTX drop"])
    got = [injector.irq(2, MSIX, 1, 0.0) for _ in range(4)]
    assert [d is not None and d.delay for d in got] == [False, 0.001, 0.001, False]
    assert injector.irq(1, MSIX, 1, 0.0) is None  # another session
    assert injector.irq(2, MSIX, 0, 0.0) is None  # another vector
    intx = injector.irq(2, INTX, 5, 0.0)
    assert intx is not None and intx.drop and intx.delay == 0.0
    stats = injector.statistics()
    assert (stats.rule(1).matched, stats.rule(1).applied) == (2, 2)
    assert stats.rule(1).injected_delay == pytest.approx(0.002)
    assert (stats.rule(2).matched, stats.rule(2).applied) == (1, 1)


def test_probability_and_delays_are_seeded_per_vector() -> None:
    def run(seed: int, order: list[int]) -> dict[int, list[object]]:
        injector = Injector(["irq * p=0.3 drop", "irq * delay uniform(10us,1ms)"], seed=seed)
        seen: dict[int, list[object]] = {0: [], 1: []}
        for vector in order:
            d = injector.irq(1, MSIX, vector, 0.0)
            assert d is not None
            seen[vector].append("drop" if d.drop else d.delay)
        return seen

    one = run(7, [0, 1] * 50)
    # another interleaving of the vectors: each vector's draws are the same
    assert run(7, [0] * 50 + [1] * 50) == one
    assert run(8, [0, 1] * 50) != one
    drops = sum(x == "drop" for x in one[0] + one[1])
    assert 10 < drops < 55
    stats = Injector(["irq * p=0.3 drop", "irq * delay uniform(10us,1ms)"], seed=7)
    for vector in [0, 1] * 50:
        stats.irq(1, MSIX, vector, 0.0)
    counted = stats.statistics()
    # a dropped interrupt is not delayed too
    assert (counted.rule(1).applied, counted.rule(2).applied) == (drops, 100 - drops)


def test_forget_restarts_a_sessions_indexes() -> None:
    injector = Injector(["irq * index=0 drop"])
    assert injector.irq(1, MSIX, 0, 0.0) is not None
    assert injector.irq(1, MSIX, 0, 0.0) is None
    injector.forget(1)
    assert injector.irq(1, MSIX, 0, 0.0) is not None
