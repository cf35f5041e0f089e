"""Rule text and rule files: parsing, canonical text, round trips, and errors."""

from __future__ import annotations

import errno
import os

import pytest

from vfioproxy.errors import VfioProxyError
from vfioproxy.inject import (
    Bandwidth,
    Close,
    Corrupt,
    Delay,
    Drop,
    Error,
    Fixed,
    InjectError,
    IntRange,
    Jittered,
    Kind,
    Match,
    Normal,
    Rule,
    RuleSyntaxError,
    Stall,
    Uniform,
    load_rules,
    loads_rules,
    parse_rule,
    rule_from_dict,
)
from vfioproxy.protocol.header import Command
from vfioproxy.side import Direction

EXAMPLES = [
    "c2s REGION_READ delay normal(200us,50us)",
    "* * delay fixed(100us)",
    "s2c DEVICE_SET_IRQS reply drop",
    "c2s DEVICE_GET_REGION_INFO error EINVAL",
    "c2s REGION_WRITE region=7 offset=0x40..0x50 p=0.5 corrupt offset mask=0xff",
    "c2s * session=2 index=10.. close before",
    "s2c * bandwidth 10MiB/s",
    "c2s * stall 5ms",
    "* REGION_READ,REGION_WRITE request index=5..10 delay uniform(1us,2ms)+-3ns",
    "s2c 14,99 close after",
    "* * id=7 delay lognormal(1ms,0.5)",
    "c2s DMA_MAP corrupt body+3 mask=0x80",
    "s2c DMA_READ corrupt count",
    "c2s * p=0.001 drop",
    "* * reply region=6 offset=..0x100 delay pareto(100us,2.5)",
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_example_rules_print_back_as_written_and_parse_to_equal_rules(text):
    rule = parse_rule(text)
    assert rule.to_text() == text
    assert parse_rule(rule.to_text()) == rule
    assert rule.text == text


@pytest.mark.parametrize("text", EXAMPLES)
def test_the_structured_form_round_trips(text):
    rule = parse_rule(text)
    assert rule_from_dict(rule.to_dict()) == rule


def test_rules_parse_into_match_and_action():
    rule = parse_rule("c2s REGION_WRITE region=7 offset=0x40..0x50 p=0.5 corrupt offset mask=0xff")
    assert rule == Rule(
        Match(Direction.C2S, frozenset({Command.REGION_WRITE}), region=7,
              offset=IntRange(0x40, 0x50), probability=0.5),
        Corrupt("offset", 0xFF),
    )
    assert parse_rule("* * delay fixed(100us)") == Rule(Match(), Delay(Fixed(100e-6)))
    assert parse_rule("s2c DEVICE_SET_IRQS reply drop").match.kind is Kind.REPLY
    assert parse_rule("c2s DEVICE_GET_REGION_INFO error EINVAL").action == Error(errno.EINVAL)
    assert parse_rule("c2s * session=2 index=10.. close before").match == Match(
        "c2s", session=2, index=IntRange(10)
    )
    assert parse_rule("s2c * bandwidth 10MiB/s").action == Bandwidth(10 * 2**20)
    assert parse_rule("c2s * stall 5ms").action == Stall(5e-3)
    assert parse_rule("c2s * close").action == Close("before")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("C2S region_read  delay 5ms", "c2s REGION_READ delay fixed(5ms)"),
        ("* 9 delay uniform( 1us , 2us )", "* REGION_READ delay uniform(1us,2us)"),
        ("* * kind=reply probability=25% drop", "* * reply p=0.25 drop"),
        ("* * region=config offset=64 drop", "* * region=7 offset=0x40 drop"),
        ("* * index=..3 DROP", "* * index=..3 drop"),
        ("c2s * error 22", "c2s * error EINVAL"),
        ("c2s * CLOSE After", "c2s * close after"),
        ("c2s * corrupt BODY+0x10 mask=1", "c2s * corrupt body+16"),
        ("* * delay 5ms±1ms", "* * delay fixed(5ms)+-1ms"),
        ("* REGION_WRITE,REGION_READ,REGION_READ drop", "* REGION_READ,REGION_WRITE drop"),
    ],
)
def test_rules_have_one_canonical_text(text, canonical):
    rule = parse_rule(text)
    assert rule.to_text() == canonical
    assert parse_rule(canonical) == rule


def test_the_id_can_be_given_in_text_or_as_argument():
    assert parse_rule("* * id=3 drop").id == 3
    assert parse_rule("* * drop", id=5).id == 5
    assert parse_rule("* * drop", id=5).to_text() == "* * id=5 drop"
    assert parse_rule("* * drop").id == 0


def test_rule_text_is_kept_but_not_compared():
    a = parse_rule("C2S   * drop")
    assert a.text == "C2S * drop"
    assert a == parse_rule("c2s * drop")
    assert Rule(Match(), Drop()).text == "* * drop"


@pytest.mark.parametrize(
    ("text", "token", "position", "message"),
    [
        ("", None, 0, "missing direction"),
        ("c2s", None, 3, "missing command"),
        ("c2s *", None, 5, "missing action"),
        ("up * drop", "up", 0, "unknown direction"),
        ("c2s FOO drop", "FOO", 4, "unknown command"),
        ("c2s REGION_READ,FOO drop", "FOO", 16, "unknown command"),
        ("c2s REGION_READ, drop", "REGION_READ,", 4, "empty command name"),
        ("c2s 70000 drop", "70000", 4, "at most 0xffff"),
        ("c2s * often drop", "often", 6, "unknown filter or action"),
        ("c2s * color=red drop", "color=red", 6, "unknown filter or action"),
        ("c2s * session drop", "session", 6, "unknown filter or action"),
        ("c2s * kind=both drop", "both", 11, "unknown kind"),
        ("c2s * session=-1 drop", "-1", 14, "must not be negative"),
        ("c2s * session=1 session=2 drop", "session=2", 16, "session given twice"),
        ("c2s * request reply drop", "reply", 14, "kind given twice"),
        ("c2s * index=x.. drop", "x", 12, "expected an integer for index"),
        ("c2s * index=9..3 drop", "9..3", 12, "empty range"),
        ("c2s * region=BAR9 drop", "BAR9", 13, "unknown region"),
        ("c2s * offset=0x10..0xg drop", "0xg", 19, "expected an integer for offset"),
        ("c2s * p=1.5 drop", "1.5", 8, "between 0 and 1"),
        ("c2s * id=x drop", "x", 9, "rule id"),
        ("c2s * delay", None, 11, "missing distribution"),
        ("c2s * delay 5", "5", 12, "needs a unit"),
        ("c2s * delay gamma(1us)", "gamma", 12, "unknown distribution"),
        ("c2s * delay normal(1us,)", "", 23, "expected a duration"),
        ("c2s * delay uniform(1us,2us", "(", 19, "never closed"),
        ("c2s * delay 1us)", ")", 15, "')' without '('"),
        ("c2s * bandwidth fast", "fast", 16, "expected a rate"),
        ("c2s * bandwidth 10Mbit/s", "Mbit/s", 18, "unknown rate unit"),
        ("c2s * error ENOTANERRNO", "ENOTANERRNO", 12, "unknown errno"),
        ("c2s * close later", "later", 12, "'before' or 'after'"),
        ("c2s * corrupt", None, 13, "missing field"),
        ("c2s * corrupt payload", "payload", 14, "unknown corrupt field"),
        ("c2s * corrupt body+x", "x", 19, "body offset"),
        ("c2s * corrupt msg_id mask=0", "msg_id", 14, "positive"),
        ("c2s * corrupt msg_id mask=0x10000", "msg_id", 14, "wider than field msg_id"),
        ("c2s * corrupt flags mask=zz", "zz", 25, "expected an integer for mask"),
        ("c2s * stall 0ms", "0ms", 12, "duration must be > 0"),
        ("c2s * stall soon", "soon", 12, "expected a duration"),
        ("c2s * drop now", "now", 11, "only filters may follow"),
        ("c2s * drop p=0.5 now", "now", 17, "only filters may follow"),
        ("c2s * drop p=0.5 p=0.2", "p=0.2", 17, "probability given twice"),
        ("c2s * close maybe", "maybe", 12, "must be 'before' or 'after'"),
        ("c2s REGION_READ reply error EINVAL", "error", 22, "only matches replies"),
        ("c2s DMA_MAP region=1 drop", "region=1", 12, "only match REGION_READ"),
        ("c2s DMA_MAP corrupt region", "corrupt", 12, "has a field region"),
    ],
)
def test_bad_rules_name_the_token_and_its_position(text, token, position, message):
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule(text)
    error = info.value
    assert message in str(error)
    assert (error.token, error.position) == (token, position)
    assert error.text == text
    assert isinstance(error, VfioProxyError)


def test_error_text_shows_token_position_and_rule():
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule("c2s FOO drop")
    assert str(info.value) == (
        "unknown command (use a name such as REGION_READ, or a number): 'FOO' at position 4 "
        "of 'c2s FOO drop'"
    )


# --------------------------------------------------------------------- structured form


def test_structured_rules_build_the_same_rule_as_text():
    table = {
        "direction": "c2s",
        "command": ["REGION_WRITE", 9],
        "region": "CONFIG",
        "offset": "0x40..0x50",
        "probability": 0.5,
        "index": 3,
        "session": 1,
        "kind": "request",
        "action": "corrupt",
        "field": "offset",
        "mask": 0xFF,
        "id": 4,
    }
    assert rule_from_dict(table) == parse_rule(
        "c2s REGION_READ,REGION_WRITE request session=1 index=3 region=7 offset=0x40..0x50 "
        "p=0.5 id=4 corrupt offset mask=0xff"
    )
    assert rule_from_dict({"action": "delay", "distribution": "normal(1ms,1us)+-2us"}) == Rule(
        Match(), Delay(Jittered(Normal(1e-3, 1e-6), 2e-6))
    )
    assert rule_from_dict({"action": "bandwidth", "rate": 1000}).action == Bandwidth(1000)
    assert rule_from_dict({"action": "error", "errno": 5}).action == Error(errno.EIO)
    assert rule_from_dict({"action": "close"}).action == Close("before")
    assert rule_from_dict({"action": "stall", "duration": "2ms"}).action == Stall(2e-3)
    assert rule_from_dict({"rule": "* * drop", "id": 9}) == Rule(Match(), Drop(), 9)


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ({"direction": "c2s"}, "action", "needs 'rule'"),
        ({"action": "explode"}, "action", "unknown action"),
        ({"action": "drop", "colour": 1}, "colour", "unknown key"),
        ({"action": "drop", "distribution": "1us"}, "distribution", "not a parameter"),
        ({"action": "delay"}, "distribution", "needs this key"),
        ({"action": "delay", "distribution": "gamma(1us)"}, "distribution", "unknown distrib"),
        ({"action": "delay", "distribution": 5}, "distribution", "expected a distribution"),
        ({"action": "stall", "duration": 5}, "duration", "expected a duration"),
        ({"action": "drop", "session": True}, "session", "expected an integer"),
        ({"action": "drop", "session": -1}, "session", "must be an integer >= 0"),
        ({"action": "drop", "direction": "up"}, "direction", "unknown direction"),
        ({"action": "drop", "command": ["FOO"]}, "command", "unknown command"),
        ({"action": "drop", "command": []}, "command", "empty command set"),
        ({"action": "drop", "index": "3..1"}, "index", "empty range"),
        ({"action": "drop", "probability": "200%"}, "probability", "between 0 and 1"),
        ({"action": "drop", "probability": 2}, "probability", "between 0 and 1"),
        ({"action": "drop", "region": "BAR7"}, "region", "unknown region"),
        ({"action": "drop", "command": "DMA_MAP", "offset": 4}, "offset", "only match"),
        ({"action": "error", "errno": "EFOO"}, "errno", "unknown errno"),
        ({"action": "close", "when": "never"}, "when", "before' or 'after"),
        ({"action": "corrupt", "field": "nope"}, "field", "unknown corrupt field"),
        ({"action": "corrupt", "field": "msg_id", "mask": 0x1FFFF}, "mask", "wider"),
        ({"action": "error", "errno": 5, "kind": "reply"}, "action", "only matches replies"),
        ({"action": "drop", "id": -2}, "id", "rule id"),
        ({"rule": "* * drop", "action": "drop"}, "action", "no other key than id"),
        ({"rule": 5}, "rule", "rule text as a string"),
        ({"rule": "* * dorp"}, "rule", "unknown filter or action"),
    ],
)
def test_bad_structured_rules_name_the_key(table, key, message):
    with pytest.raises(RuleSyntaxError) as info:
        rule_from_dict(table)
    assert info.value.key == key
    assert message in str(info.value)


# --------------------------------------------------------------------- files

RULES_TOML = """
[[rule]]
rule = "c2s REGION_READ delay normal(200us,50us)"

[[rule]]
direction = "s2c"
command = "DEVICE_SET_IRQS"
kind = "reply"
action = "drop"

[[rule]]
rule = "s2c * bandwidth 10MiB/s"
id = 12

[[rule]]
command = ["REGION_WRITE"]
region = 7
offset = "0x40..0x50"
probability = 0.5
action = "corrupt"
field = "offset"
mask = 0xff
"""


def test_rule_files_load_text_and_structured_rules(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(RULES_TOML)
    rules = load_rules(path)
    assert [r.to_text() for r in rules] == [
        "c2s REGION_READ delay normal(200us,50us)",
        "s2c DEVICE_SET_IRQS reply drop",
        "s2c * id=12 bandwidth 10MiB/s",
        "* REGION_WRITE region=7 offset=0x40..0x50 p=0.5 corrupt offset mask=0xff",
    ]
    assert load_rules(os.fspath(path)) == rules


def test_an_empty_rule_file_has_no_rules():
    assert loads_rules("") == ()


@pytest.mark.parametrize(
    ("text", "rule_number", "key", "message"),
    [
        ("[[rule]]\nrule = 'c2s * drop'\n[[rule]]\naction = 'delay'\n", 2, "distribution",
         "needs this key"),
        ("[[rule]]\nrule = 'c2s FOO drop'\n", 1, "rule", "unknown command"),
        ("[[rule]]\naction='drop'\n[[rule]]\naction='drop'\n[[rule]]\nsesion=1\naction='drop'\n",
         3, "sesion", "unknown key"),
        ("seed = 3\n", None, "seed", "unknown top-level key"),
        ("rule = 'c2s * drop'\n", None, "rule", "expected [[rule]] tables"),
        ("[[rule]\n", None, None, "not valid TOML"),
    ],
)
def test_rule_file_errors_name_file_rule_number_and_key(tmp_path, text, rule_number, key, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RuleSyntaxError) as info:
        load_rules(path)
    error = info.value
    assert (error.source, error.rule_number, error.key) == (str(path), rule_number, key)
    assert str(error).startswith(f"{path}: ")
    assert message in str(error)


def test_rule_file_error_text_reads_as_one_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[[rule]]\naction = 'delay'\ndistribution = 'normal(1us,x)'\n")
    with pytest.raises(RuleSyntaxError) as info:
        load_rules(path)
    assert str(info.value) == (
        f"{path}: rule 1: key 'distribution': expected a duration such as 200us: "
        "'x' at position 11 of 'normal(1us,x)'"
    )


def test_a_missing_rule_file_is_an_inject_error(tmp_path):
    with pytest.raises(InjectError, match="cannot read rules"):
        load_rules(tmp_path / "absent.toml")


def test_uniform_in_text_and_table_agree():
    assert rule_from_dict({"action": "delay", "distribution": "uniform(1us,2us)"}).action == (
        Delay(Uniform(1e-6, 2e-6))
    )


@pytest.mark.parametrize(("after", "before"), [
    ("c2s * drop p=0.5", "c2s * p=0.5 drop"),
    ("irq * drop p=0.01", "irq * p=0.01 drop"),
    ("irq MSIX[0] delay fixed(100us) session=2", "irq MSIX[0] session=2 delay fixed(100us)"),
    ("c2s REGION_READ error EINVAL request id=4", "c2s REGION_READ request id=4 error EINVAL"),
    ("c2s * close reply", "c2s * reply close"),
    ("c2s * close after session=1", "c2s * session=1 close after"),
    ("c2s DMA_MAP corrupt offset mask=0x4 p=25%", "c2s DMA_MAP p=25% corrupt offset mask=0x4"),
])
def test_filters_may_follow_the_action(after: str, before: str) -> None:
    """``irq * drop p=0.01`` (as a user writes it) is ``irq * p=0.01 drop``: the
    same rule, written back with its filters first."""
    a, b = parse_rule(after), parse_rule(before)
    assert (a.match, a.action, a.id) == (b.match, b.action, b.id)
    assert a.to_text() == b.to_text()
