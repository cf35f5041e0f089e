"""The action registry: an action is one class, and everything else derives from it.

The tests define actions that exist only here (one per engine phase that
has room for a new kind) and check that the rule text, the rule file form,
the canonical text, the checks and the engine take them up with nothing
else written for them.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest

from vfioproxy.inject import (
    ACTIONS,
    Injector,
    RuleSyntaxError,
    loads_rules,
    parse_rule,
    rule_from_dict,
)
from vfioproxy.inject.actions import (
    DELAYING,
    ActionTraits,
    Fate,
    FateAction,
    Param,
    Phase,
    RewriteAction,
    TimingAction,
    TimingState,
    register,
)
from vfioproxy.inject.values import parse_uint
from vfioproxy.protocol.bodies import RawBody
from vfioproxy.protocol.codec import build_command, encode
from vfioproxy.protocol.header import Command
from vfioproxy.side import Direction

C2S = Direction.C2S


def _byte(value: int | str) -> int:
    number = parse_uint(value, "value") if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= 0xFF:
        raise RuleSyntaxError(f"poke: value must be 0..255, got {value!r}")
    return number


@attrs.frozen
class Poke(RewriteAction):
    """Write ``value`` at absolute byte ``at`` of the forwarded message."""

    at: int = attrs.field(converter=lambda v: parse_uint(v, "at") if isinstance(v, str) else v)
    value: int = attrs.field(default=0, converter=_byte)
    name: ClassVar[str] = "poke"
    params: ClassVar[tuple[Param, ...]] = (
        Param("at", (int, str), "a byte offset", lambda v: Poke(v).at, toml=lambda v: v,
              hint="byte offset"),
        Param("value", (int, str), "a byte", _byte, lambda v: f"{v:#x}", toml=lambda v: v,
              optional=True, keyword=True),
    )

    def apply(self, data: bytearray, command: int | None) -> tuple[int | None, str]:
        if self.at >= len(data):
            return None, "past the end: unchanged"
        data[self.at] = self.value
        return self.at, ""


@attrs.frozen
class Hop(TimingAction):
    """Add ``per_byte`` seconds for each byte of the message (a slow bus)."""

    per_byte: float = attrs.field(converter=float)
    name: ClassVar[str] = "hop"
    params: ClassVar[tuple[Param, ...]] = (
        Param("per_byte", (float, int, str), "seconds per byte", float),)

    def time(
        self, t: float, size: int, forward: bool, state: TimingState
    ) -> tuple[float, float, str]:
        return t + size * self.per_byte, size * self.per_byte, ""


@attrs.frozen
class Swallow(FateAction):
    """Drop requests only, answering nothing (a fate action with a trait)."""

    name: ClassVar[str] = "swallow"
    traits: ClassVar[ActionTraits] = ActionTraits(reads_header=True, requests_only=True)

    def fate(self, data: bytes) -> Fate:
        return Fate(note="swallowed")


@pytest.fixture
def registered():
    before = dict(ACTIONS)
    for cls in (Poke, Hop, Swallow):
        register(cls)
    yield
    ACTIONS.clear()
    ACTIONS.update(before)


def message(msg_id: int = 1) -> bytes:
    return encode(build_command(Command.DEVICE_GET_INFO, msg_id, RawBody(b"\0" * 8)))[0]


def test_the_built_in_actions_are_registered_once_each_in_their_phase():
    assert list(ACTIONS) == ["delay", "bandwidth", "error", "drop", "close", "corrupt", "stall"]
    phases = {name: cls.phase for name, cls in ACTIONS.items()}
    assert phases == {
        "delay": Phase.TIMING, "bandwidth": Phase.TIMING, "error": Phase.FATE,
        "drop": Phase.FATE, "close": Phase.FATE, "corrupt": Phase.REWRITE, "stall": Phase.HOLD,
    }
    with pytest.raises(ValueError, match="registered twice"):
        register(ACTIONS["drop"])


def test_an_unregistered_action_is_not_an_action():
    with pytest.raises(RuleSyntaxError, match="unknown filter or action"):
        parse_rule("c2s * poke 3")
    with pytest.raises(RuleSyntaxError, match="not an action"):
        attrs.evolve(parse_rule("c2s * drop"), action=Poke(3))


def test_a_new_action_gets_the_rule_text_from_its_params(registered):
    rule = parse_rule("c2s DEVICE_GET_INFO poke 0x12 value=0x7f")
    assert rule.action == Poke(0x12, 0x7F)
    assert rule.to_text() == "c2s DEVICE_GET_INFO poke 18 value=0x7f"
    assert parse_rule(rule.to_text()) == rule
    # a keyword parameter at its default is left out, and may be left out
    assert parse_rule("c2s * poke 4").action == Poke(4, 0)
    assert parse_rule("c2s * poke 4").to_text() == "c2s * poke 4"


def test_a_new_action_gets_the_rule_file_form_from_its_params(registered):
    rule = parse_rule("s2c * poke 20 value=3")
    assert rule.to_dict() == {"direction": "s2c", "action": "poke", "at": 20, "value": 3}
    assert rule_from_dict(rule.to_dict()) == rule
    document = '[[rule]]\naction = "poke"\nat = "0x14"\nvalue = 3\ndirection = "s2c"\n'
    (loaded,) = loads_rules(document)
    assert loaded == rule
    assert rule_from_dict({"action": "hop", "per_byte": 1e-6}).action == Hop(1e-6)


def test_a_new_action_gets_errors_naming_the_token_and_the_key(registered):
    with pytest.raises(RuleSyntaxError, match="missing byte offset") as info:
        parse_rule("c2s * poke")
    assert info.value.position == len("c2s * poke")
    with pytest.raises(RuleSyntaxError, match=r"value must be 0\.\.255") as info:
        parse_rule("c2s * poke 3 value=300")
    assert info.value.token == "value=300"
    with pytest.raises(RuleSyntaxError, match="only filters may follow"):
        parse_rule("c2s * poke 3 extra")
    with pytest.raises(RuleSyntaxError) as info:
        rule_from_dict({"action": "poke", "at": 1, "value": -1})
    assert info.value.key == "value"
    with pytest.raises(RuleSyntaxError, match="needs this key") as info:
        rule_from_dict({"action": "poke"})
    assert info.value.key == "at"
    with pytest.raises(RuleSyntaxError, match="not a parameter of action 'drop'"):
        rule_from_dict({"action": "drop", "at": 1})


def test_the_engine_runs_a_new_action_in_its_phase(registered):
    injector = Injector(["c2s * poke 16 value=0xaa", "c2s * hop 0.5", "c2s * delay fixed(1s)"])
    data = message()
    decision = injector.decide(1, C2S, data, 10.0)
    assert decision.forward
    assert decision.data[16] == 0xAA and decision.data[:16] == data[:16]
    assert decision.release_at == 10.0 + len(data) * 0.5 + 1.0
    assert [(a.action.name, a.value) for a in decision.applied] == [
        ("poke", 16), ("hop", len(data) * 0.5), ("delay", 1.0)]
    stats = {s.text: s for s in injector.statistics().rules}
    assert stats["c2s * hop 0.5"].injected_delay == len(data) * 0.5
    assert stats["c2s * poke 16 value=0xaa"].injected_delay == 0
    assert Hop.phase in DELAYING and Poke.phase not in DELAYING


def test_a_new_fate_action_decides_alone_and_its_traits_hold(registered):
    injector = Injector(["c2s * swallow", "c2s * drop"])
    decision = injector.decide(1, C2S, message(), 0.0)
    assert not decision.forward
    assert [(a.action.name, a.note) for a in decision.applied] == [("swallow", "swallowed")]
    # requests only: a message without a header is not a request, drop takes it
    short = injector.decide(1, C2S, b"\1\2", 0.0)
    assert [a.action.name for a in short.applied] == ["drop"]
