"""The timeline's outputs: the step table, the side by side, the PNG and the
HTML page, first on timelines built by hand (every number known), then
end to end through ``vfioproxy trace timeline`` on the real captures."""

import json
import re

import pytest

from recorder.reader import TraceReader
from recorder.records import EventKind
from recorder.writer import TraceWriter
from tests.realdata import TRACES, capture_messages
from vfioproxy.cli import main
from vfioproxy.side import Direction
from vfioproxy.trace.timeline.compare import compare, comparison_lines, comparison_rows
from vfioproxy.trace.timeline.html import html_page
from vfioproxy.trace.timeline.model import Label, LabelledMessage, SessionTimeline, StepTimes
from vfioproxy.trace.timeline.png import draw_timelines, have_matplotlib
from vfioproxy.trace.timeline.spans import ServerSpan, server_spans
from vfioproxy.trace.timeline.table import session_lines, session_notes, step_rows

MS = 1_000_000


def message(seq, t_ms, direction, msg_id, step, *, reply=False, size=16, certain=True,
            reason=""):
    return LabelledMessage(
        seq=seq, t_ns=int(t_ms * MS), direction=direction, msg_id=msg_id, command=1,
        is_reply=reply, size=size, label=Label(step, certain, reason),
        summary=f"message {seq}", function=f"function of {step}",
    )


C2S, S2C = Direction.C2S, Direction.S2C


def timeline(name="a.trace", *, r2_reply_ms=3.0, with_rom=True, unlabelled=False,
             cut_short=False):
    """R1 (one round trip, 1 ms at the server), R2 (two commands, one reply at
    ``r2_reply_ms``), a ROM load of 262144 bytes over 2 ms, and optionally an
    unlabelled message."""
    messages = [
        message(0, 10.0, C2S, 1, "R1"), message(1, 11.0, S2C, 1, "R1", reply=True),
        message(2, 12.0, C2S, 2, "R2"), message(3, 12.5, C2S, 3, "R2"),
        message(4, r2_reply_ms + 10, S2C, 3, "R2", reply=True),
    ]
    steps = [
        StepTimes("R1", 2, 10 * MS, 11 * MS, 1 * MS, 0, 32),
        StepTimes("R2", 3, 12 * MS, int((r2_reply_ms + 10) * MS),
                  int((r2_reply_ms - 2.5) * MS), int(0.5 * MS), 48),
    ]
    if with_rom:
        messages += [message(5, 20.0, C2S, 4, "rom-load", size=32),
                     message(6, 22.0, S2C, 4, "rom-load", reply=True, size=262176)]
        steps.append(StepTimes("rom-load", 2, 20 * MS, 22 * MS, 2 * MS, 0, 262208,
                               rom_bytes=262144))
    if unlabelled:
        messages.append(message(7, 23.0, C2S, 9, "unlabelled", reason="no rule for command 1"))
        steps.append(StepTimes("unlabelled", 1, 23 * MS, 23 * MS, 0, 0, 16))
    return SessionTimeline(name, 1, tuple(messages), tuple(steps),
                           unlabelled=int(unlabelled), cut_short=cut_short)


def test_step_rows_give_each_step_its_name_times_shares_bytes_and_rom_throughput():
    rows = step_rows(timeline())
    assert [r[:3] for r in rows] == [["R1", "version", "2"], ["R2", "DMA listener replay", "3"],
                                     ["rom-load", "ROM load", "2"]]
    assert rows[0][3:8] == ["0.000", "1.000", "1.000", "0.000", "32"]
    assert rows[1][3:8] == ["2.000", "1.000", "0.500", "0.500", "48"]
    assert rows[2][3:] == ["10.000", "2.000", "2.000", "0.000", "262208", "131.1"]


def test_an_uncertain_step_is_shown_with_a_question_mark_and_its_count():
    base = timeline()
    r1 = base.steps[0]
    uncertain = SessionTimeline(base.trace, 1, base.messages,
                                (StepTimes("R1", r1.messages, r1.first_ns, r1.last_ns,
                                           r1.server_ns, r1.client_ns, r1.bytes, uncertain=1),
                                 *base.steps[1:]))
    assert step_rows(uncertain)[0][0] == "R1? (1)"
    assert any("1 labels the wire alone cannot decide" in n for n in session_notes(uncertain))


def test_notes_count_the_unlabelled_and_say_when_the_trace_was_cut_short():
    assert session_notes(timeline()) == ["7 messages, 0 unlabelled"]
    notes = session_notes(timeline(unlabelled=True, cut_short=True))
    assert notes[0].startswith("8 messages, 1 unlabelled")
    assert "label.reason" in notes[0]
    assert notes[1].startswith("cut short: the trace ends inside this session")
    lines = session_lines(timeline(unlabelled=True, cut_short=True))
    assert lines[0] == "a.trace session 1"
    assert lines[-2:] == notes


def test_server_spans_pair_commands_with_their_replies_and_skip_unanswered_ones():
    assert server_spans(timeline().messages) == [
        ServerSpan("R1", 10 * MS, 11 * MS), ServerSpan("R2", int(12.5 * MS), 13 * MS),
        ServerSpan("rom-load", 20 * MS, 22 * MS),
    ]


def test_side_by_side_gives_deltas_absent_steps_and_the_step_that_explains_most():
    first, second = timeline("a.trace"), timeline("b.trace", r2_reply_ms=7.0, with_rom=False)
    comparison = compare([first, second])
    rows = comparison_rows(comparison)
    assert rows[0] == ["R1", "version", "1.000", "1.000", "+0.000"]
    assert rows[1] == ["R2", "DMA listener replay", "1.000", "5.000", "+4.000"]
    assert rows[2] == ["rom-load", "ROM load", "2.000", "absent", "-2.000"]
    assert rows[3] == ["between steps", "in no step", "8.000", "1.000", "-7.000"]
    assert rows[4] == ["total", "first to last message", "12.000", "7.000", "-5.000"]
    assert comparison.only_in(0) == ["rom-load"] and comparison.only_in(1) == []
    explanation = comparison.explanations[0]
    assert (explanation.step, explanation.delta_ns, explanation.total_delta_ns,
            explanation.between_delta_ns) == ("rom-load", -2 * MS, -5 * MS, -7 * MS)
    notes = comparison_lines(comparison)
    assert "#1: a.trace session 1" in notes and "#2: b.trace session 1" in notes
    assert "steps #1 has and another session lacks: rom-load" in notes
    assert ("#2 vs #1: -5.000 ms in total; the step explaining most of it is rom-load "
            "(ROM load): -2.000 ms (40%); between steps -7.000 ms (140%)") in notes
    as_json = json.loads(json.dumps(comparison.to_dict()))
    assert as_json["steps"][2]["durations_ns"] == [2 * MS, None]
    assert as_json["explanations"][0]["step"] == "rom-load"
    assert as_json["between_steps"]["durations_ns"] == [8 * MS, 1 * MS]
    slower = compare([timeline(with_rom=False),
                      timeline("c.trace", r2_reply_ms=7.0, with_rom=False)]).explanations[0]
    assert (slower.step, slower.delta_ns, slower.share) == ("R2", 4 * MS, 1.0)


def test_html_page_is_self_contained_with_the_step_table_and_every_message():
    page = html_page([timeline(unlabelled=True)])
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<script src" not in page and "<link" not in page
    data = json.loads(page.split('id="timeline-data">', 1)[1].split("</script>", 1)[0])
    session = data["sessions"][0]
    assert [lane["step"] for lane in session["lanes"]] == ["R1", "R2", "rom-load", "unlabelled"]
    assert session["lanes"][0]["function"] == "hw/vfio-user/proxy.c:vfio_user_validate_version"
    assert len(session["messages"]) == 8
    assert session["messages"][-1]["reason"] == "no rule for command 1"
    assert session["spans"][1] == [1, 2.5, 3.0]
    assert '<td class=text>rom-load</td><td class=text>ROM load</td>' in page
    assert 'id="compare"' not in page


def test_html_page_of_two_sessions_has_the_side_by_side_table():
    page = html_page([timeline("a.trace"), timeline("b.<b>.trace", with_rom=False)])
    assert 'id="compare"' in page
    assert "b.&lt;b&gt;.trace" in page and "b.<b>" not in page.split("<script", 1)[0]


@pytest.mark.skipif(not have_matplotlib(), reason="matplotlib is not installed")
def test_png_has_a_lane_per_step_ticks_per_message_and_the_server_share_shaded():
    figure = draw_timelines([timeline(), timeline("b.trace", with_rom=False)])
    try:
        first, second = figure.axes
        assert [t.get_text() for t in first.get_yticklabels()] == [
            "R1  version", "R2  DMA listener replay", "rom-load  ROM load"]
        ticks = {c.get_gid(): len(c.get_segments()) for c in first.collections
                 if (c.get_gid() or "").startswith("ticks:")}
        assert ticks == {"ticks:R1": 2, "ticks:R2": 3, "ticks:rom-load": 2}
        shaded = [c.get_gid() for c in first.collections
                  if (c.get_gid() or "").startswith("server:")]
        assert shaded == ["server:R1", "server:R2", "server:rom-load"]
        assert len(second.get_yticklabels()) == 2
    finally:
        import matplotlib.pyplot
        matplotlib.pyplot.close(figure)


# --- end to end: `vfioproxy trace timeline` on the bundled real captures ---

E1K = TRACES / "qemu-realize-qemu-server-e1000e-001.trace"
NVME = TRACES / "qemu-realize-qemu-server-nvme-001.trace"
LVU = TRACES / "qemu-realize-libvfio-user-server-001.trace"
GPIO = TRACES / "qemu-realize-gpio-001.trace"
E1K_BOOT = TRACES / "qemu-boot-qemu-server-e1000e-001.trace"
NVME_BOOT = TRACES / "qemu-boot-qemu-server-nvme-001.trace"


def run(capsys, *argv):
    """``vfioproxy trace timeline argv``: exit code, stdout lines, stderr."""
    code = main(["trace", "timeline", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def rows_of(lines):
    """The first table's rows in ``lines``: step -> its cells."""
    start = next(i for i, line in enumerate(lines) if line.startswith("─")) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("path", sorted(TRACES.glob("qemu-*.trace")), ids=lambda p: p.stem)
def test_every_real_qemu_capture_gets_a_table_of_its_steps_with_nothing_unlabelled(capsys, path):
    code, lines, err = run(capsys, path)
    assert (code, err) == (0, "")
    assert lines[0] == f"{path} session 1"
    rows = rows_of(lines)
    assert list(rows)[:2] == ["R1", "R2"]
    assert [line for line in lines if " unlabelled" in line][-1].endswith(", 0 unlabelled")


def test_the_e1000e_boot_shows_its_256_kib_rom_load_and_its_throughput(capsys):
    code, lines, _ = run(capsys, E1K_BOOT)
    rom = rows_of(lines)["rom-load"]
    assert code == 0 and rom[1] == "ROM load" and rom[2] == "4"
    assert float(rom[-1]) > 0  # ROM MB/s
    code, lines, _ = run(capsys, "--json", E1K_BOOT)
    (session,) = json.loads("\n".join(lines))["sessions"]
    (step,) = [s for s in session["steps"] if s["step"] == "rom-load"]
    assert step["rom_bytes"] == 256 * 1024
    assert float(rom[-1]) == pytest.approx(step["rom_throughput"] / 1e6, abs=0.05)


def test_the_nvme_boot_shows_its_posted_doorbell_writes_and_intx_eois(capsys):
    code, lines, _ = run(capsys, NVME_BOOT)
    rows = rows_of(lines)
    assert code == 0
    assert int(rows["bar-mmio-posted"][2]) >= 518  # posted: no reply, one message each
    assert int(rows["intx-eoi"][2]) == 2 * 202
    assert rows["bar-mmio-posted"][5] == "0.000"  # no server share: nothing waited


def test_four_real_servers_side_by_side_name_absent_steps_and_what_explains_the_difference(
        capsys):
    code, lines, _ = run(capsys, LVU, GPIO, E1K, NVME)
    assert code == 0
    start = lines.index("side by side (durations, Δ against #1)")
    rows = rows_of(lines[start:])
    assert rows["R10"][2:4] == ["absent", "absent"]  # LVU and GPIO have no MSI-X
    assert rows["R11"][2:] == ["absent", "absent", "+0.000", rows["R11"][5], rows["R11"][6],
                               "absent", "+0.000"]
    assert f"#3: {E1K} session 1" in lines
    assert any(line.startswith("steps #3 has and another session lacks: R10, R11, S3")
               for line in lines)
    assert sum(line.startswith("#2 vs #1: ") and "the step explaining most of it is " in line
               for line in lines) == 1
    code, lines, _ = run(capsys, "--json", LVU, GPIO, E1K, NVME)
    result = json.loads("\n".join(lines))
    assert [s["trace"] for s in result["side_by_side"]["sessions"]] == list(
        map(str, (LVU, GPIO, E1K, NVME)))
    assert [e["session"] for e in result["side_by_side"]["explanations"]] == [1, 2, 3]


def _two_sessions(path):
    """A trace with the e1000e realize as session 1 and the nvme one as session 3."""
    with TraceReader(E1K) as reader:
        header = reader.header
    with TraceWriter(path, header) as writer:
        for session, source in ((1, E1K), (3, NVME)):
            writer.write_event(session, EventKind.SESSION_OPEN, 0)
            for record in capture_messages(source):
                writer.write_message(session, record.direction, record.t_ns, record.data,
                                     record.fds)
            writer.write_event(session, EventKind.SESSION_CLOSE, record.t_ns)


def test_a_trace_of_two_sessions_shows_both_and_session_picks_one(capsys, tmp_path):
    two = tmp_path / "two.trace"
    _two_sessions(two)
    code, lines, _ = run(capsys, two)
    assert code == 0
    assert [line for line in lines if line.startswith(str(two))] == [
        f"{two} session 1", f"{two} session 3"]
    assert "side by side (durations, Δ against #1)" in lines
    code, lines, _ = run(capsys, "--session", 3, two)
    assert code == 0 and lines[0] == f"{two} session 3"
    assert "side by side (durations, Δ against #1)" not in lines
    assert "R11" not in rows_of(lines)  # nvme: no MSI cap


def test_a_trace_cut_short_is_shown_up_to_its_end_and_says_so(capsys, tmp_path):
    data = E1K.read_bytes()
    cut = tmp_path / "cut.trace"
    cut.write_bytes(data[: len(data) // 2])
    code, lines, err = run(capsys, cut)
    assert code == 0
    assert "trace truncated after record" in err
    assert lines[-1].startswith("cut short: the trace ends inside this session")
    assert "S1" not in rows_of(lines)


def test_png_and_html_are_written_and_an_existing_one_is_kept_without_force(capsys, tmp_path):
    png, page = tmp_path / "t.png", tmp_path / "t.html"
    code, lines, _ = run(capsys, "--png", png, "--html", page, E1K, NVME)
    assert code == 0 and lines[0] == f"{E1K} session 1"
    if have_matplotlib():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'id="compare"' in page.read_text()
    page.write_text("kept")
    code, _, err = run(capsys, "--html", page, E1K)
    assert code == 2
    assert err == f"vfioproxy trace timeline: {page} already exists (--force replaces it)\n"
    assert page.read_text() == "kept"
    code, _, _ = run(capsys, "--html", page, "--force", E1K)
    assert code == 0 and page.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(("argv", "error"), [
    (["--session", "4", E1K], f"{E1K}: no session 4 in the trace (sessions with messages: 1)"),
    (["/nonexistent/x.trace"], "No such file or directory"),
    ([TRACES.parent / "README.md"], "README.md"),
    (["--png", "same.out", "--html", "same.out", E1K], "--png and --html both name same.out"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, error):
    code, lines, err = run(capsys, *argv)
    assert code == 2 and lines == []
    assert err.startswith("vfioproxy trace timeline: ") and err.count("\n") == 1
    assert error in err


def test_times_count_from_the_earliest_message_when_the_directions_are_out_of_order():
    base = timeline(with_rom=False)
    early_reply = message(1, 9.5, S2C, 1, "R1", reply=True)  # recorded before its command
    shuffled = SessionTimeline(base.trace, 1, (base.messages[0], early_reply,
                                               *base.messages[2:]),
                               (StepTimes("R1", 2, int(9.5 * MS), 10 * MS, 0, 0, 32),
                                base.steps[1]))
    assert [row[3] for row in step_rows(shuffled)] == ["0.000", "2.500"]
    assert compare([shuffled, shuffled]).spans_ns() == [int(3.5 * MS)] * 2


def test_side_by_side_keeps_a_step_the_display_order_does_not_name():
    base = timeline(with_rom=False)
    other = SessionTimeline("b.trace", 1, base.messages,
                            (*base.steps, StepTimes("x-new", 1, 13 * MS, 14 * MS, 0, 0, 16)))
    assert [s.step for s in compare([base, other]).steps] == ["R1", "R2", "x-new"]
