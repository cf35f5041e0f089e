import json
import subprocess
import sys

import pytest

from tests.realdata import RAWCAP, TRACES
from vfioproxy.cli import main
from vfioproxy.protocol.codec import decode

QEMU_REALIZE = TRACES / "qemu-realize-libvfio-user-server-001.trace"
E1000E_REALIZE = TRACES / "qemu-realize-qemu-server-e1000e-001.trace"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def message_lines(out):
    return [
        line for line in out.splitlines()
        if line[:1] == " " and " s1 " in line and "---" not in line
    ]


def test_trace_show_lists_every_message_of_a_real_qemu_realize(capsys):
    code, out, err = run(capsys, "trace", "show", QEMU_REALIZE)
    assert code == 0 and err == ""
    lines = message_lines(out)
    assert len(lines) == 82
    assert "VERSION cmd id=0" in lines[0]
    assert "DMA_READ/DMA_WRITE layout client qemu, server spec (detected" in out
    assert "[fds: memfd 512 MiB]" in out
    assert "cfg WR4 @0x30 ROM BAR = 0xfffff800 (sizing)" in out
    assert "cfg RD1 @0x3d interrupt_pin = 0x01 (INTA#)" in out
    assert "sparse-mmap [0x0+0x1000], [0x2000+0x1000]" in out
    assert "DEVICE_RESET reply id=" in out


def test_trace_show_reads_pci_capabilities_of_a_real_device(capsys):
    code, out, _ = run(capsys, "trace", "show", E1000E_REALIZE)
    assert code == 0
    assert "8086:10d3" in out
    assert "MSI-X[0xa0].msg_ctl = 0x0004 (5 vectors, disabled)" in out
    assert "ROM BAR = 0xfffc0000 → ROM size 256 KiB" in out


def test_trace_show_verbose_prints_every_field(capsys):
    code, out, _ = run(capsys, "trace", "show", "-v", QEMU_REALIZE)
    assert code == 0
    assert "header: msg_id=0 command=VERSION (1) size=214 flags=0x0 error=0" in out
    # VERSION's JSON as JSON, payloads as hexdumps, no Python reprs anywhere
    assert '  json: {\n' in out and '"max_msg_fds": 16,\n' in out
    assert "0010  00 00 00 00 7b 22 63 61 70 61 62 69 6c 69 74 69  |....{\"capabiliti|" in out
    assert "fd[0]: kind=memfd, size=0x20000000 (536870912)" in out
    assert "areas[1]: SparseMmapArea\n" in out and "offset: 0x2000 (8192)\n" in out
    assert "iova: 0xfffc0000 (4294705152)" in out
    for python in ("VersionJson(", "{'", "=None", "SparseMmapArea("):
        assert python not in out


def test_trace_show_json_lines_carry_exact_bytes_and_decoded_fields(capsys):
    code, out, _ = run(capsys, "trace", "show", "--json", QEMU_REALIZE)
    assert code == 0
    objs = [json.loads(line) for line in out.splitlines()]
    messages = [o for o in objs if o["record"] == "message"]
    assert len(messages) == 82
    for obj in messages:
        assert decode(bytes.fromhex(obj["hex"])).header.size == obj["size"]
    first = messages[0]
    assert first["command"] == "VERSION" and first["body"]["type"] == "VersionBody"
    negotiated = next(o for o in objs if o["record"] == "negotiated")
    assert negotiated["dma_layout"] == {"client": "qemu", "server": "spec", "detected": True}
    replies = [o for o in messages if o["type"] == "reply"]
    assert all(o["latency_ns"] > 0 for o in replies)


def test_trace_show_takes_a_dma_layout_override(capsys):
    _, out, _ = run(capsys, "trace", "show", "--client-dma", "spec", QEMU_REALIZE)
    assert "layout client spec, server spec (as given)" in out


def test_trace_show_selects_one_session(capsys):
    code, out, _ = run(capsys, "trace", "show", "--session", "1", QEMU_REALIZE)
    assert code == 0 and len(message_lines(out)) == 82


def test_trace_stats_reports_counts_latencies_and_fds(capsys):
    code, out, _ = run(capsys, "trace", "stats", QEMU_REALIZE)
    assert code == 0
    assert "messages: 82" in out
    assert "request -> reply latency (us)" in out
    assert any(line.startswith("DMA_MAP ") and " 6 " in line for line in out.splitlines())
    rows = [line.split() for line in out.splitlines()]
    assert ["memfd", "c2s", "3"] in rows and ["eventfd", "c2s", "3"] in rows


def test_trace_stats_json_matches_the_capture(capsys):
    code, out, _ = run(capsys, "trace", "stats", "--json", QEMU_REALIZE)
    assert code == 0
    data = json.loads(out)
    assert data["messages"] == 82 and data["undecoded"] == 0
    assert data["violations"] == {}
    rows = {(r["command"], r["dir"], r["kind"]): r["messages"] for r in data["traffic"]}
    assert rows[("DEVICE_GET_REGION_INFO", "c2s", "command")] == 8
    assert rows[("DEVICE_SET_IRQS", "c2s", "command")] == 4
    latency = data["latency"]["REGION_READ"]
    assert latency["count"] == 9
    assert latency["p50_ns"] <= latency["p90_ns"] <= latency["p99_ns"] <= latency["max_ns"]
    fds = {(f["kind"], f["dir"]): f["count"] for f in data["fds"]}
    assert fds == {("memfd", "c2s"): 3, ("eventfd", "c2s"): 3, ("file", "s2c"): 1}


def test_trace_show_warns_about_a_torn_tail_and_shows_what_is_whole(capsys, tmp_path):
    torn = tmp_path / "torn.trace"
    data = QEMU_REALIZE.read_bytes()
    torn.write_bytes(data[:-7])  # into the final session_close event
    code, out, err = run(capsys, "trace", "show", torn)
    assert code == 0
    assert "trace truncated after record 83" in err
    assert len(message_lines(out)) == 82
    assert "session_close" not in out


def test_trace_show_names_a_file_that_is_not_a_trace(capsys, tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello\n")
    code, _, err = run(capsys, "trace", "show", bogus)
    assert code == 2
    assert "notes.txt" in err and "not a vfioproxy trace" in err


def test_trace_show_names_a_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "trace", "show", tmp_path / "nope.trace")
    assert code == 2 and "nope.trace" in err


def test_trace_import_converts_a_rawcap_capture(capsys, tmp_path):
    src = RAWCAP / "qemu-realize-gpio-001.jsonl"
    if not src.exists():
        pytest.skip(f"{src} is not here")
    code, out, _ = run(capsys, "trace", "import", src, tmp_path)
    assert code == 0 and "78 messages" in out
    code, out, _ = run(capsys, "trace", "show", tmp_path / "qemu-realize-gpio-001.trace")
    assert len(message_lines(out)) == 78
    assert "494f:0dc8" in out


def test_python_dash_m_vfioproxy_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "vfioproxy", "trace", "stats", str(QEMU_REALIZE)],
        capture_output=True, text=True, check=True,
    )
    assert "messages: 82" in result.stdout


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--max-queue", "0", "--max-queue: expected a size of at least 1 byte, got 0"),
    ("--max-message-buffer", "1G",
     "--max-message-buffer: expected a size from 16 to 64M bytes, got 1G"),
    ("--max-message-buffer", "lots",
     "expected a size from 16 to 64M bytes such as 64k or 16M, got 'lots'"),
    ("--max-sessions", "0", "--max-sessions: expected an integer >= 1, got 0"),
])
def test_proxy_limits_out_of_range_are_refused_in_one_line(capsys, tmp_path, option, value,
                                                           words):
    with pytest.raises(SystemExit) as exit_info:
        main(["proxy", "--listen", str(tmp_path / "p.sock"), "--server",
              str(tmp_path / "s.sock"), option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
