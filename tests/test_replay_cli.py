"""``vfioproxy replay client|server``: arguments, output and exit status."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.realdata import TRACES
from vfioproxy.cli import main
from vfioproxy.peers.client import realize
from vfioproxy.peers.server import DeviceOptions, open_device_server

REALIZE = TRACES / "reference-realize-001.trace"
E1000E = TRACES / "qemu-realize-qemu-server-e1000e-001.trace"


def run_cli(*argv: str) -> int:
    return main(list(argv))


@contextmanager
def device_server(path: Path, options: DeviceOptions | None = None) -> Iterator[None]:
    """The reference server in a thread of its own (the CLI runs its own trio loop)."""
    listening, stop = threading.Event(), threading.Event()

    async def serve() -> None:
        async with open_device_server(path, options=options or DeviceOptions()):
            listening.set()
            await trio.to_thread.run_sync(stop.wait)

    thread = threading.Thread(target=trio.run, args=(serve,))
    thread.start()
    try:
        assert listening.wait(5)
        yield
    finally:
        stop.set()
        thread.join()


def test_replay_client_exits_0_and_prints_the_summary_when_nothing_diverged(tmp_path, capsys):
    with device_server(tmp_path / "dev.sock"):
        status = run_cli("replay", "client", str(REALIZE), "--server", str(tmp_path / "dev.sock"))
    out = capsys.readouterr().out
    assert status == 0
    assert "no divergence" in out
    assert "summary: 96 of 96 recorded messages replayed (48 sent, 48 received)" in out


def test_replay_client_exits_1_with_the_divergence_as_json(tmp_path, capsys):
    with device_server(tmp_path / "dev.sock", DeviceOptions(vendor_id=0x1AF4)):
        status = run_cli("replay", "client", str(REALIZE), "--server",
                         str(tmp_path / "dev.sock"), "--json")
    report = json.loads(capsys.readouterr().out)
    assert status == 1 and report["ok"] is False
    assert [d["text"] for d in report["divergences"]] == [
        "message #29 REGION_READ reply (config space offset 0x0, 4096 bytes): "
        "data[0x0:0x2] (vendor_id) 0x1af4 != recorded 0x1b36"
    ]


def test_replay_client_ignore_rules_come_from_the_command_line(tmp_path, capsys):
    with device_server(tmp_path / "dev.sock", DeviceOptions(vendor_id=0x1AF4)):
        status = run_cli("replay", "client", str(REALIZE), "--server",
                         str(tmp_path / "dev.sock"), "--ignore", "REGION_READ:data[0x0:0x2]")
    assert status == 0, capsys.readouterr().out


def test_replay_client_exits_2_when_the_replay_cannot_run(tmp_path, capsys):
    status = run_cli("replay", "client", str(REALIZE), "--server", str(tmp_path / "none.sock"))
    assert status == 2
    assert "vfioproxy replay client: cannot connect to the server" in capsys.readouterr().err
    (tmp_path / "bad.trace").write_bytes(b"junk")
    assert run_cli("replay", "client", str(tmp_path / "bad.trace"), "--server", "x") == 2
    assert "not a vfioproxy trace" in capsys.readouterr().err


def test_bad_arguments_are_refused_by_the_parser(capsys):
    for argv in (["--ignore", ":x"], ["--timeout", "0"], ["--speed", "-1"]):
        with pytest.raises(SystemExit) as refused:
            run_cli("replay", "client", str(REALIZE), "--server", "s", *argv)
        assert refused.value.code == 2
    assert run_cli("replay", "server", str(E1000E), "--listen", "s",
                   "--on-mismatch", "passthrough") == 2
    assert "needs --passthrough-server" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("side", "argv", "says"),
    [
        ("client", ["--ignore", "REGION_RAED:data[0x2:0x4]"],
         "argument --ignore: bad ignore rule 'REGION_RAED:data[0x2:0x4]': unknown command "
         "'REGION_RAED' (did you mean REGION_READ?)"),
        ("client", ["--ignore", "REGION_READ:dtaa"], "unknown field 'dtaa' (did you mean data?)"),
        ("client", ["--ignore", "data[0x2"], "malformed field 'data[0x2'"),
        ("server", ["--match-on", "command,ofset"],
         "argument --match-on: bad match key 'ofset': unknown field 'ofset' (did you mean "
         "offset?)"),
    ],
)
def test_unknown_commands_fields_and_malformed_ranges_exit_2_naming_the_nearest(
    capsys, side, argv, says
):
    where = ["--server", "s"] if side == "client" else ["--listen", "s"]
    with pytest.raises(SystemExit) as refused:
        run_cli("replay", side, str(REALIZE), *where, *argv)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_replay_server_serves_one_client_and_exits_with_its_report(tmp_path, capsys):
    path = tmp_path / "replay.sock"
    status: list[int] = []
    thread = threading.Thread(
        target=lambda: status.append(run_cli("replay", "server", str(E1000E), "--listen",
                                             str(path)))
    )
    thread.start()
    err = ""
    deadline = time.monotonic() + 5
    while "replaying the server" not in err:  # printed once it listens
        assert time.monotonic() < deadline, "the replay server never started"
        time.sleep(0.005)
        err += capsys.readouterr().err
    result = trio.run(realize, path)
    thread.join()
    assert (result.vendor_id, result.device_id) == (0x8086, 0x10D3)
    assert status == [0]
    assert f"replaying the server of {E1000E} on {path}" in err
    out = capsys.readouterr().out
    assert "summary: 96 of 96 recorded messages replayed (48 sent, 48 received)" in out


def test_replay_client_plays_past_a_damaged_record_names_it_and_exits_1(tmp_path, capsys):
    import msgpack

    from recorder.reader import TraceReader
    trace = tmp_path / "damaged.trace"
    data = REALIZE.read_bytes()
    with TraceReader(REALIZE) as reader:
        last = max(record.seq for record in reader)
    # a message record shorter than a vfio-user header, after every record
    short = msgpack.packb({"k": "m", "q": last + 1, "s": 1, "d": "s2c", "t": 1, "f": [],
                           "b": b"\x01\x00"}, use_bin_type=True)
    trace.write_bytes(data + short)
    with device_server(tmp_path / "dev.sock"):
        status = run_cli("replay", "client", str(trace), "--server", str(tmp_path / "dev.sock"),
                         "--json")
    report = json.loads(capsys.readouterr().out)
    assert status == 1
    assert report["damaged"] == 1 and not report["ok"] and report["divergences"] == []
    assert report["replayed"] == report["recorded"] == 96
    assert report["notes"][0].startswith(
        f"damaged record: {trace}: record {last + 1}: byte offset {len(data)}: ")
    assert f"{trace}: skipped 1 damaged record" in report["notes"]
