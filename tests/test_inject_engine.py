"""The injection engine: timing, order, faults, combination, randomness, runtime changes."""

from __future__ import annotations

import errno
import struct
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfioproxy.inject import (
    Applied,
    Decision,
    Delay,
    Drop,
    Fixed,
    InjectError,
    Injector,
    Match,
    Rule,
    parse_rule,
)
from vfioproxy.inject.view import inspect
from vfioproxy.protocol.bodies import RegionAccessBody
from vfioproxy.protocol.codec import build_command, build_error_reply, build_reply, decode, encode
from vfioproxy.protocol.header import Command
from vfioproxy.side import Direction

C2S, S2C = Direction.C2S, Direction.S2C


def raw(message):
    return encode(message)[0]


def read(offset=0x40, region=7, count=4, msg_id=1):
    return build_command(Command.REGION_READ, msg_id, RegionAccessBody(offset, region, count))


def write(data=b"\0" * 4, offset=0x40, region=0, msg_id=1, no_reply=False):
    body = RegionAccessBody(offset, region, len(data), data)
    return build_command(Command.REGION_WRITE, msg_id, body, no_reply=no_reply)


def reset(msg_id=1):
    return build_command(Command.DEVICE_RESET, msg_id)


def values(decision):
    return [a.value for a in decision.applied]


# --------------------------------------------------------------------- basics


def test_without_rules_messages_pass_unchanged_and_at_once():
    injector = Injector()
    data = raw(read())
    assert injector.decide(0, C2S, data, 5.0) == Decision(5.0, True, data, index=0)


def test_messages_are_numbered_per_session_and_direction():
    injector = Injector()
    indexes = [
        injector.decide(session, direction, raw(reset()), 0.0).index
        for session, direction in [(0, C2S), (0, C2S), (0, S2C), (1, C2S), (0, C2S), (1, C2S)]
    ]
    assert indexes == [0, 1, 0, 0, 2, 1]


def test_a_delay_postpones_the_release_and_records_the_drawn_value():
    injector = Injector(["c2s REGION_READ delay fixed(2ms)"])
    decision = injector.decide(0, C2S, raw(read()), 1.0)
    assert decision.release_at == pytest.approx(1.002)
    assert decision.forward
    assert decision.applied == (Applied(1, Delay(Fixed(2e-3)), 2e-3),)
    assert injector.decide(0, C2S, raw(reset()), 2.0).release_at == 2.0


def test_wildcard_rules_apply_to_messages_shorter_than_a_header():
    injector = Injector(["* * delay fixed(1ms)", "* REGION_READ delay fixed(1s)"])
    decision = injector.decide(0, C2S, b"\x01\x02\x03", 0.0)
    assert decision.release_at == pytest.approx(0.001)
    assert decision.data == b"\x01\x02\x03"
    assert [a.rule_id for a in decision.applied] == [1]


# --------------------------------------------------------------------- order and timing


def test_a_short_delay_after_a_long_one_is_released_no_earlier():
    injector = Injector(["c2s * index=0 delay fixed(10ms)"])
    first = injector.decide(0, C2S, raw(read(msg_id=1)), 0.0)
    second = injector.decide(0, C2S, raw(read(msg_id=2)), 0.001)
    assert first.release_at == pytest.approx(0.010)
    assert second.release_at == first.release_at
    assert second.applied == ()


def test_random_delays_never_reorder_a_direction():
    injector = Injector(["c2s * delay uniform(0us,10ms)"], seed=3)
    releases = [injector.decide(0, C2S, raw(reset()), i * 0.001).release_at for i in range(500)]
    assert releases == sorted(releases)
    assert all(r >= i * 0.001 for i, r in enumerate(releases))


def test_delaying_one_direction_never_holds_the_other():
    injector = Injector(["c2s * delay fixed(1s)"])
    assert injector.decide(0, C2S, raw(read()), 0.0).release_at == 1.0
    reply = build_reply(read(), RegionAccessBody(0x40, 7, 4, b"abcd"))
    assert injector.decide(0, S2C, raw(reply), 0.1).release_at == 0.1


def test_delaying_one_session_never_holds_another():
    injector = Injector(["c2s * session=1 delay fixed(1s)"])
    assert injector.decide(1, C2S, raw(reset()), 0.0).release_at == 1.0
    assert injector.decide(2, C2S, raw(reset()), 0.1).release_at == 0.1


def test_delays_of_several_rules_add_up():
    injector = Injector(["* * delay fixed(1ms)", "c2s * delay fixed(2ms)", "s2c * delay 1s"])
    decision = injector.decide(0, C2S, raw(reset()), 0.0)
    assert decision.release_at == pytest.approx(0.003)
    assert values(decision) == [1e-3, 2e-3]


def test_a_stall_holds_the_direction_from_the_matched_message_on():
    injector = Injector(["c2s * index=2 stall 5ms"])
    times = [0.0, 0.5, 1.0, 1.002, 1.006]
    releases = [injector.decide(0, C2S, raw(reset()), t).release_at for t in times]
    assert releases == pytest.approx([0.0, 0.5, 1.005, 1.005, 1.006])
    assert injector.decide(0, S2C, raw(reset()), 1.001).release_at == 1.001


def test_a_stall_does_not_rearm_while_its_direction_is_stalled():
    injector = Injector(["c2s * stall 5ms"])
    decisions = [injector.decide(0, C2S, raw(reset()), t) for t in (0.0, 0.001, 0.006)]
    assert [d.release_at for d in decisions] == pytest.approx([0.005, 0.005, 0.011])
    assert [len(d.applied) for d in decisions] == [1, 0, 1]
    stats = injector.statistics().rule(1)
    assert (stats.matched, stats.applied) == (3, 2)
    assert stats.injected_delay == pytest.approx(0.010)


def test_bandwidth_serialises_messages_on_a_link():
    injector = Injector(["c2s * bandwidth 1000B/s"])
    message = raw(write(b"x" * 68))  # 32 + 68 = 100 bytes: 0.1 s at 1000 B/s
    assert len(message) == 100
    first = injector.decide(0, C2S, message, 0.0)
    second = injector.decide(0, C2S, message, 0.0)
    third = injector.decide(0, C2S, message, 1.0)
    assert [first.release_at, second.release_at, third.release_at] == pytest.approx(
        [0.1, 0.2, 1.1]
    )
    assert values(second) == pytest.approx([0.2])
    assert injector.decide(0, S2C, message, 0.0).release_at == 0.0


def test_bandwidth_queues_after_a_delay_in_rule_order():
    injector = Injector(["c2s * delay fixed(1s)", "c2s * bandwidth 16B/s"])
    assert injector.decide(0, C2S, raw(reset()), 0.0).release_at == pytest.approx(2.0)


# --------------------------------------------------------------------- faults


def test_an_error_rule_answers_the_request_with_an_exact_error_reply():
    injector = Injector(["c2s DEVICE_RESET error EIO"])
    decision = injector.decide(0, C2S, raw(reset(msg_id=0x1234)), 0.0)
    assert not decision.forward
    assert decision.reply == struct.pack("<HHIII", 0x1234, 13, 16, 0x21, errno.EIO)
    assert decision.reply == raw(build_error_reply(reset(msg_id=0x1234), errno.EIO))
    reply = decode(decision.reply)
    assert reply.is_reply and reply.is_error and reply.header.error == errno.EIO
    assert values(decision) == [errno.EIO]


def test_an_error_rule_keeps_command_and_id_of_any_request():
    injector = Injector(["* * error 4000"])
    decision = injector.decide(0, S2C, raw(build_command(Command.DMA_READ, 77)), 0.0)
    assert decision.reply == struct.pack("<HHIII", 77, Command.DMA_READ, 16, 0x21, 4000)


def test_an_error_rule_drops_a_no_reply_request_without_answering():
    injector = Injector(["c2s REGION_WRITE error EINVAL"])
    decision = injector.decide(0, C2S, raw(write(no_reply=True)), 0.0)
    assert not decision.forward and decision.reply is None
    assert "no_reply" in decision.applied[0].note


def test_an_error_rule_lets_replies_through_without_counting_them():
    injector = Injector(["* REGION_READ error EINVAL"])
    reply = build_reply(read(), RegionAccessBody(0x40, 7, 4, b"abcd"))
    decision = injector.decide(0, S2C, raw(reply), 0.0)
    assert decision.forward and decision.applied == ()
    assert injector.decide(0, C2S, b"tiny", 0.0).forward
    assert injector.statistics().rule(1).matched == 0


def test_a_delayed_error_reply_holds_later_requests_of_its_direction():
    injector = Injector(["c2s * index=0 delay fixed(5ms)", "c2s * index=0 error EBUSY"])
    failed = injector.decide(0, C2S, raw(reset(1)), 0.0)
    later = injector.decide(0, C2S, raw(reset(2)), 0.001)
    assert failed.release_at == pytest.approx(0.005) and failed.reply is not None
    assert later.release_at == pytest.approx(0.005) and later.forward


@pytest.mark.parametrize(
    ("field", "mask", "offset"),
    [("msg_id", 0x8000, 0), ("command", 0x1, 2), ("size", 0x100, 4), ("flags", 0x20, 8),
     ("error", 0xFF, 12), ("body+0", 0x80, 16), ("body+9", 0xFF00, 25), ("offset", 0xFF, 16),
     ("region", 0x3, 24), ("count", 0xFFFF_FFFF, 28)],
)
def test_corrupt_flips_the_bits_of_the_mask_in_the_field(field, mask, offset):
    injector = Injector([f"c2s REGION_READ corrupt {field} mask={mask:#x}"])
    original = raw(read(0x40, 7, 4, msg_id=3))
    decision = injector.decide(0, C2S, original, 0.0)
    width = max(1, (mask.bit_length() + 7) // 8)
    if field in ("msg_id", "command"):
        width = 2
    elif field in ("size", "flags", "error", "region", "count"):
        width = 4
    elif field == "offset":
        width = 8
    before = int.from_bytes(original[offset : offset + width], "little")
    after = int.from_bytes(decision.data[offset : offset + width], "little")
    assert after == before ^ mask
    assert decision.data[:offset] == original[:offset]
    assert decision.data[offset + width :] == original[offset + width :]
    assert values(decision) == [offset]
    assert decision.forward


def test_corrupt_outside_the_message_leaves_it_unchanged_and_says_so():
    injector = Injector(["* * corrupt body+16", "* * corrupt offset"])
    data = raw(reset())
    decision = injector.decide(0, C2S, data, 0.0)
    assert decision.data == data
    assert values(decision) == [None, None]
    assert "outside the 16-byte message" in decision.applied[0].note
    assert "DEVICE_RESET has no field offset" in decision.applied[1].note
    short = injector.decide(0, C2S, b"\x01\x02", 0.0)
    assert short.data == b"\x01\x02"


def test_corrupts_apply_in_rule_order_and_can_cancel():
    injector = Injector(["* * corrupt msg_id mask=0x3", "* * corrupt msg_id mask=0x1"])
    data = raw(reset(msg_id=0))
    assert injector.decide(0, C2S, data, 0.0).data[:2] == b"\x02\x00"


def test_close_before_does_not_forward_and_close_after_does():
    before = Injector(["c2s * close before"]).decide(0, C2S, raw(reset()), 0.0)
    assert (before.forward, before.close_before, before.close_after) == (False, True, False)
    after = Injector(["c2s * close after"]).decide(0, C2S, raw(reset()), 0.0)
    assert (after.forward, after.close_before, after.close_after) == (True, False, True)
    assert values(after) == ["after"]


def test_drop_forwards_nothing_and_draws_no_delay():
    injector = Injector(["c2s * delay fixed(1s)", "c2s * drop"])
    decision = injector.decide(0, C2S, raw(reset()), 0.0)
    assert (decision.forward, decision.reply, decision.release_at) == (False, None, 0.0)
    assert decision.applied == (Applied(2, Drop()),)
    assert injector.decide(0, C2S, raw(reset()), 0.1).release_at == pytest.approx(0.1)
    assert injector.statistics().rule(1).matched == 2


def test_the_first_drop_error_or_close_decides_the_fate():
    drop_first = Injector(["* * drop", "* * error EIO", "* * close before"])
    decision = drop_first.decide(0, C2S, raw(reset()), 0.0)
    assert (decision.forward, decision.reply, decision.close_before) == (False, None, False)
    assert [a.rule_id for a in decision.applied] == [1]
    close_first = Injector(["* * close after", "* * drop"])
    decision = close_first.decide(0, C2S, raw(reset()), 0.0)
    assert (decision.forward, decision.close_after) == (True, True)
    error_first = Injector(["* * error EIO", "* * close before"])
    decision = error_first.decide(0, C2S, raw(reset()), 0.0)
    assert decision.reply is not None and not decision.close_before


def test_corrupt_and_bandwidth_only_apply_to_forwarded_messages():
    injector = Injector(["* * corrupt msg_id", "* * bandwidth 1B/s", "* * close before"])
    decision = injector.decide(0, C2S, raw(reset()), 0.0)
    assert decision.data == raw(reset()) and decision.release_at == 0.0
    assert [a.action.name for a in decision.applied] == ["close"]


# --------------------------------------------------------------------- reply matching


def config_reply(request, data=b"\1\2\3\4"):
    body = request.body
    return build_reply(request, RegionAccessBody(body.offset, body.region, len(data), data))


def test_replies_match_region_and_offset_of_the_request_they_answer():
    injector = Injector(["s2c REGION_READ reply region=7 offset=0x40..0x50 delay fixed(1ms)"])
    inside, outside = read(0x44, msg_id=1), read(0x60, msg_id=2)
    injector.decide(0, C2S, raw(inside), 0.0)
    injector.decide(0, C2S, raw(outside), 0.0)
    # error replies carry no region: only the tracked request tells it
    assert injector.decide(0, S2C, raw(build_error_reply(outside, 5)), 0.0).applied == ()
    assert injector.decide(0, S2C, raw(build_error_reply(inside, 5)), 0.0).applied != ()


def test_replies_to_reused_ids_are_paired_first_in_first_out():
    injector = Injector(["s2c * reply region=7 offset=0x40 drop"])
    injector.decide(0, C2S, raw(read(0x40, msg_id=5)), 0.0)
    injector.decide(0, C2S, raw(read(0x80, msg_id=5)), 0.0)
    first = injector.decide(0, S2C, raw(build_error_reply(read(msg_id=5), 5)), 0.0)
    second = injector.decide(0, S2C, raw(build_error_reply(read(msg_id=5), 5)), 0.0)
    assert (first.forward, second.forward) == (False, True)


def test_a_reply_whose_request_was_not_seen_is_matched_by_its_own_body():
    injector = Injector(["s2c * reply region=7 offset=0x40..0x50 drop"])
    assert not injector.decide(0, S2C, raw(config_reply(read(0x48))), 0.0).forward
    assert injector.decide(0, S2C, raw(build_error_reply(read(0x48), 5)), 0.0).forward


def test_requests_are_tracked_per_session_and_only_when_forwarded():
    injector = Injector(["c2s * index=0 drop", "s2c * reply region=7 drop"])
    injector.decide(0, C2S, raw(read(msg_id=1)), 0.0)  # dropped: never answered
    injector.decide(0, C2S, raw(read(msg_id=2)), 0.0)
    assert injector.decide(0, S2C, raw(build_error_reply(read(msg_id=1), 5)), 0.0).forward
    assert injector.decide(1, S2C, raw(build_error_reply(read(msg_id=2), 5)), 0.0).forward
    assert not injector.decide(0, S2C, raw(build_error_reply(read(msg_id=2), 5)), 0.0).forward


def test_replies_to_server_commands_pair_with_the_other_direction():
    injector = Injector(["c2s * reply region=7 drop"])
    injector.decide(0, C2S, raw(read(msg_id=9)), 0.0)  # c2s request with id 9
    # a c2s reply with id 9 answers an s2c request, not the c2s one
    assert injector.decide(0, C2S, raw(build_error_reply(read(msg_id=9), 5)), 0.0).forward


# --------------------------------------------------------------------- probability and seeds


def test_probability_is_the_fraction_of_matched_messages_that_fire():
    injector = Injector(["c2s * p=0.3 drop", "s2c * p=0 drop", "s2c * p=1 delay 1us"], seed=11)
    dropped = sum(not injector.decide(0, C2S, raw(reset()), 0.0).forward for _ in range(10_000))
    assert dropped / 10_000 == pytest.approx(0.3, abs=0.02)
    for _ in range(100):
        assert len(injector.decide(0, S2C, raw(reset()), 0.0).applied) == 1
    stats = injector.statistics()
    assert (stats.rule(1).matched, stats.rule(1).applied) == (10_000, dropped)
    assert (stats.rule(2).matched, stats.rule(2).applied) == (100, 0)
    assert (stats.rule(3).matched, stats.rule(3).applied) == (100, 100)


RANDOM_RULES = ["* * p=0.5 delay normal(1ms,200us)", "* * p=0.2 drop",
                "* * delay pareto(10us,2.0)+-5us"]


def run(injector, schedule):
    out: dict[tuple[int, Direction], list[tuple[bool, tuple[float, ...]]]] = {}
    for session, direction in schedule:
        decision = injector.decide(session, direction, raw(reset()), 0.0)
        out.setdefault((session, direction), []).append(
            (decision.forward, tuple(a.value for a in decision.applied))
        )
    return out


def test_the_same_seed_reproduces_the_same_decisions():
    schedule = [(0, C2S), (0, S2C)] * 200
    assert run(Injector(RANDOM_RULES, seed=5), schedule) == run(
        Injector(RANDOM_RULES, seed=5), schedule
    )
    assert run(Injector(RANDOM_RULES, seed=5), schedule) != run(
        Injector(RANDOM_RULES, seed=6), schedule
    )


def test_draws_do_not_depend_on_how_sessions_and_directions_interleave():
    keys = [(1, C2S), (1, S2C), (2, C2S), (2, S2C)]
    one_after_another = [key for key in keys for _ in range(100)]
    interleaved = keys * 100
    assert run(Injector(RANDOM_RULES, seed=9), one_after_another) == run(
        Injector(RANDOM_RULES, seed=9), interleaved
    )


def test_draws_of_one_rule_do_not_depend_on_other_rules():
    alone = run(Injector(["* * id=4 delay uniform(0s,1ms)"], seed=2), [(0, C2S)] * 50)
    crowded = run(
        Injector(["* * id=1 p=0.5 delay normal(1ms,1us)", "* * id=4 delay uniform(0s,1ms)"],
                 seed=2),
        [(0, C2S)] * 50,
    )
    assert [v[-1] for _, v in alone[(0, C2S)]] == [v[-1] for _, v in crowded[(0, C2S)]]


# --------------------------------------------------------------------- runtime changes


def test_rules_are_added_with_fresh_ids_and_removed_at_runtime():
    injector = Injector(["c2s * delay fixed(1ms)"])
    assert [r.id for r in injector.rules] == [1]
    added = injector.add(Rule(Match(), Drop(), 10))
    assert added.id == 10
    assert injector.add("s2c * delay 1us").id == 11
    assert injector.add(parse_rule("* * p=0 drop")).id == 12
    assert [r.id for r in injector.rules] == [1, 10, 11, 12]
    assert not injector.decide(0, C2S, raw(reset()), 0.0).forward
    assert injector.remove(10) == added
    assert injector.decide(0, C2S, raw(reset()), 1.0).forward
    assert [r.id for r in injector.rules] == [1, 11, 12]
    assert injector.add("* * drop").id == 13


def test_duplicate_and_unknown_rule_ids_are_errors():
    injector = Injector(["* * id=3 drop"])
    with pytest.raises(InjectError, match="already in use"):
        injector.add("* * id=3 delay 1ms")
    with pytest.raises(InjectError, match="no rule with id 4"):
        injector.remove(4)
    with pytest.raises(InjectError):
        Injector(["* * id=2 drop", "* * id=2 drop"])


def test_a_removed_and_readded_rule_starts_fresh():
    injector = Injector(["* * id=1 delay uniform(0s,1s)"], seed=1)
    first = injector.decide(0, C2S, raw(reset()), 0.0).applied[0].value
    injector.remove(1)
    injector.add("* * id=1 delay uniform(0s,1s)")
    assert injector.decide(0, C2S, raw(reset()), 10.0).applied[0].value == first
    assert injector.statistics().rule(1).matched == 1


def test_statistics_count_matches_applications_and_injected_delay():
    injector = Injector(["c2s * delay fixed(2ms)", "c2s REGION_READ drop", "s2c * stall 1s"])
    for _ in range(3):
        injector.decide(0, C2S, raw(reset()), 0.0)
    injector.decide(0, C2S, raw(read()), 0.0)
    stats = injector.statistics()
    assert stats.messages == 4
    assert [(r.rule_id, r.matched, r.applied) for r in stats.rules] == [
        (1, 4, 3), (2, 1, 1), (3, 0, 0)
    ]
    assert stats.rule(1).injected_delay == pytest.approx(0.006)
    assert stats.rule(2).text == "c2s REGION_READ drop"
    assert stats.to_dict()["rules"][0] == {
        "rule_id": 1, "text": "c2s * delay fixed(2ms)", "matched": 4, "applied": 3,
        "injected_delay": pytest.approx(0.006),
    }
    with pytest.raises(KeyError):
        stats.rule(9)


def test_forget_drops_the_state_of_a_finished_session():
    injector = Injector(["c2s * delay fixed(1s)"])
    injector.decide(3, C2S, raw(reset()), 0.0)
    injector.forget(3)
    decision = injector.decide(3, C2S, raw(reset()), 0.5)
    assert (decision.index, decision.release_at) == (0, 1.5)


def test_applied_records_convert_to_json_ready_dicts():
    decision = Injector(["* * corrupt body+99"]).decide(0, C2S, raw(reset()), 0.0)
    assert decision.applied[0].to_dict() == {
        "rule": 1, "action": "corrupt", "text": "corrupt body+99", "value": None,
        "note": "field body+99 (bytes 115..116) is outside the 16-byte message: unchanged",
    }
    delay = Applied(2, Delay(Fixed(1e-3)), 1e-3).to_dict()
    assert delay == {"rule": 2, "action": "delay", "text": "delay fixed(1ms)", "value": 1e-3}


EVERYTHING = [
    "* * p=0.5 delay normal(10us,5us)+-1us",
    "c2s REGION_READ,REGION_WRITE region=7 offset=0x40..0x50 corrupt offset mask=0xff",
    "* * reply region=0 p=0.1 drop",
    "* * p=0.1 error EINVAL",
    "* * corrupt body+2 mask=0xffff",
    "* * corrupt count",
    "* * bandwidth 1MiB/s",
    "* * p=0.05 stall 1ms",
    "* * p=0.05 close after",
]


@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.sampled_from([C2S, S2C]), st.binary(max_size=64)),
        max_size=30,
    )
)
def test_decide_never_raises_and_keeps_each_direction_in_order(messages):
    injector = Injector(EVERYTHING, seed=1)
    last: dict[tuple[int, Direction], float] = {}
    for step, (session, direction, data) in enumerate(messages):
        decision = injector.decide(session, direction, data, step * 1e-4)
        assert decision.release_at >= step * 1e-4
        if decision.forward or decision.reply is not None or decision.close_before:
            key = (session, direction)
            assert decision.release_at >= last.get(key, 0.0)
            last[key] = decision.release_at
        assert len(decision.data) == len(data)


# --------------------------------------------------------------------- the compiled path


def test_a_decision_is_immutable_hashable_and_equal_only_to_decisions():
    decision = Injector().decide(0, C2S, raw(reset()), 1.0)
    assert decision == Decision(1.0, True, raw(reset()), index=0)
    assert decision != tuple(decision) and tuple(decision) != decision
    assert not decision == tuple(decision)  # noqa: SIM201
    assert hash(decision) == hash(Decision(1.0, True, raw(reset()), index=0))
    assert repr(decision).startswith("Decision(release_at=1.0, forward=True, data=b")
    with pytest.raises(AttributeError):
        decision.forward = False  # type: ignore[misc]


MATCHES = st.builds(
    Match,
    direction=st.sampled_from([None, C2S, S2C]),
    command=st.one_of(st.none(), st.sets(st.sampled_from([1, 9, 10, 13, 99]), min_size=1)),
    kind=st.sampled_from([None, "request", "reply"]),
    session=st.sampled_from([None, 0, 1]),
    index=st.one_of(st.none(), st.builds(lambda a, n: f"{a}..{a + n}" if n else f"{a}..",
                                         st.integers(0, 4), st.integers(0, 4))),
)
REGION_MATCHES = st.builds(
    Match,
    command=st.sampled_from([None, 9, 10, frozenset({9, 10})]),
    region=st.sampled_from([None, 0, 7]),
    offset=st.sampled_from([None, 0x40, "0x40..0x48", "0x44.."]),
)


@st.composite
def messages(draw):
    """Bytes of a message: a header with chosen fields and a region access, cut anywhere."""
    command = draw(st.sampled_from([1, 9, 10, 13, 99]))
    flags = draw(st.sampled_from([0x0, 0x1, 0x10, 0x21, 0x2]))
    access = struct.pack("<QII", draw(st.sampled_from([0x40, 0x44, 0x80])),
                         draw(st.sampled_from([0, 7])), 4)
    data = struct.pack("<HHIII", draw(st.integers(0, 3)), command, 36, flags, 0) + access + b"xyzw"
    return data[: draw(st.sampled_from([0, 3, 16, 24, 28, 31, 32, 36]))]


def reference_matches(match, data, session, direction, index):
    """Matching as the rules module documents it, read the slow way."""
    if match.direction is not None and direction is not match.direction:
        return False
    if match.session is not None and session != match.session:
        return False
    if match.index is not None and index not in match.index:
        return False
    if len(data) < 16:
        return not match.needs_header
    command, flags = struct.unpack_from("<2xH4xI", data)
    if match.command is not None and command not in match.command:
        return False
    if match.kind is not None and flags & 0xF != (0 if match.kind.value == "request" else 1):
        return False
    region = offset = None
    if command in (9, 10) and len(data) >= 28:
        offset, region = struct.unpack_from("<QI", data, 16)
    if match.region is not None and region != match.region:
        return False
    return match.offset is None or offset in match.offset


@given(
    st.one_of(MATCHES, REGION_MATCHES),
    st.sampled_from([C2S, S2C]),
    st.integers(0, 1),
    st.lists(messages(), max_size=12),
)
def test_compiled_filters_match_exactly_what_the_documented_filters_match(
    match, direction, session, datas
):
    # one direction only: no reply is paired with a tracked request
    injector = Injector([Rule(match, Delay(Fixed(0.0)))])
    for index, data in enumerate(datas):
        decision = injector.decide(session, direction, data, 0.0)
        assert bool(decision.applied) == reference_matches(match, data, session, direction, index)
        assert match.matches(inspect(data), session, direction, index) == bool(decision.applied)


def test_a_stall_holds_a_direction_whose_other_rules_apply_to_every_message():
    injector = Injector(["c2s * delay fixed(1ms)"])
    assert injector.decide(0, C2S, raw(reset()), 0.0).release_at == pytest.approx(0.001)
    stall = injector.add("c2s * stall 1s")
    assert injector.decide(0, C2S, raw(reset()), 0.1).release_at == pytest.approx(1.101)
    injector.remove(stall.id)
    held = injector.decide(0, C2S, raw(reset()), 0.2)
    assert held.release_at == pytest.approx(1.101)  # still stalled until 1.1, then 1 ms
    assert held.applied == (Applied(1, Delay(Fixed(1e-3)), 1e-3),)
    assert injector.decide(0, C2S, raw(reset()), 2.0).release_at == pytest.approx(2.001)
    assert injector.statistics().rule(1).matched == 4


def test_a_rule_for_one_session_leaves_the_others_alone():
    injector = Injector(["* * session=1 delay fixed(1ms)", "c2s * session=2 drop"])
    assert injector.decide(1, S2C, raw(reset()), 0.0).applied != ()
    assert injector.decide(2, S2C, raw(reset()), 0.0).applied == ()
    assert not injector.decide(2, C2S, raw(reset()), 0.0).forward
    assert injector.decide(3, C2S, raw(reset()), 0.0).forward
    stats = injector.statistics()
    assert (stats.messages, stats.rule(1).matched, stats.rule(2).matched) == (4, 1, 1)


def test_statistics_keep_the_counts_of_forgotten_sessions():
    injector = Injector(["c2s * delay fixed(2ms)"])
    for session in (1, 2):
        for _ in range(3):
            injector.decide(session, C2S, raw(reset()), 0.0)
        injector.decide(session, S2C, raw(reset()), 0.0)
    injector.forget(1)
    stats = injector.statistics()
    assert (stats.messages, stats.rule(1).matched, stats.rule(1).applied) == (8, 6, 6)
    assert stats.rule(1).injected_delay == pytest.approx(0.012)


def test_a_reply_to_a_request_sent_before_its_rule_came_is_matched_by_its_own_body():
    injector = Injector()
    injector.decide(0, C2S, raw(read(msg_id=1)), 0.0)  # not tracked: no rule needs it yet
    injector.add("s2c * reply region=7 drop")
    injector.decide(0, C2S, raw(read(msg_id=2)), 0.0)
    assert injector.decide(0, S2C, raw(build_error_reply(read(msg_id=1), 5)), 0.0).forward
    assert not injector.decide(0, S2C, raw(config_reply(read(msg_id=1))), 0.0).forward
    assert not injector.decide(0, S2C, raw(build_error_reply(read(msg_id=2), 5)), 0.0).forward


def test_requests_stay_tracked_after_their_rule_is_removed():
    injector = Injector(["s2c * reply id=1 region=7 drop"])
    injector.decide(0, C2S, raw(read(region=7, msg_id=5)), 0.0)
    injector.remove(1)
    # the reply still takes its request off the books while no rule looks
    assert injector.decide(0, S2C, raw(build_error_reply(read(msg_id=5), 5)), 0.0).forward
    injector.decide(0, C2S, raw(read(region=0, msg_id=5)), 0.0)
    injector.add("s2c * reply region=7 drop")
    # paired with the region 0 request, not the answered region 7 one
    assert injector.decide(0, S2C, raw(build_error_reply(read(msg_id=5), 5)), 0.0).forward


def test_threads_deciding_their_sessions_while_rules_change_lose_no_count():
    injector = Injector(["* * id=1 delay fixed(0us)"], seed=1)
    threads, sessions, per_session = 4, 150, 40
    errors: list[BaseException] = []
    snapshots = []

    def forward(thread):
        try:
            for n in range(sessions):
                session = thread * sessions + n
                for i in range(per_session):
                    direction = C2S if i % 2 else S2C
                    injector.decide(session, direction, raw(read(msg_id=i % 8)), i * 1e-6)
                if n % 2:
                    injector.forget(session)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=forward, args=(t,)) for t in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers):
            rule = injector.add("* REGION_READ reply region=7 p=0.5 delay uniform(0us,1us)")
            snapshots.append(injector.statistics())
            injector.remove(rule.id)
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    stats = injector.statistics()
    total = threads * sessions * per_session
    assert stats.messages == total
    assert (stats.rule(1).matched, stats.rule(1).applied) == (total, total)
    assert len(snapshots) > 1
    assert [s.rule(1).applied for s in snapshots] == sorted(s.rule(1).applied for s in snapshots)
    assert all(s.rule(1).applied <= s.rule(1).matched <= s.messages for s in snapshots)
