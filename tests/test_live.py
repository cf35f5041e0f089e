import io

import trio

from tests.test_proxy import Server, settle
from vfioproxy.io.transport import open_unix_fd_stream
from vfioproxy.peers.endpoint import Endpoint
from vfioproxy.protocol.bodies import RegionAccessBody, VersionBody
from vfioproxy.protocol.header import Command
from vfioproxy.proxy import DirectionStatistics, ProxyStatistics, open_proxy
from vfioproxy.proxy.live import MessageLog, run_status_line, status_text
from vfioproxy.side import Side


def test_status_text_shows_sessions_totals_and_rates():
    before = ProxyStatistics(1, 1, DirectionStatistics(10, 1024, 0),
                             DirectionStatistics(10, 2048, 0), 0)
    now = ProxyStatistics(2, 3, DirectionStatistics(30, 4096, 1),
                          DirectionStatistics(25, 8192, 0), 2)
    assert status_text(now, before, 2.0) == (
        "sessions 2/3 | c2s 30 msg 4.0 KiB 10/s | s2c 25 msg 8.0 KiB 8/s | violations 2"
    )


async def test_the_live_log_prints_one_decoded_pci_aware_line_per_message(tmp_path, nursery):
    server = Server(tmp_path / "server.sock")
    await nursery.start(server.serve)
    out = io.StringIO()
    log = MessageLog(out)
    async with open_proxy(tmp_path / "p.sock", server.path, observer=log) as proxy:
        stream = await open_unix_fd_stream(tmp_path / "p.sock")
        client = Endpoint(stream, Side.CLIENT)
        async with trio.open_nursery() as inner:
            await inner.start(client.run)
            await client.request(Command.VERSION, VersionBody.build(0, 0, None))
            await client.request(Command.REGION_READ, RegionAccessBody(0x3D, 7, 1))
            assert log.sessions == {1}
            await stream.aclose()
        await settle(proxy)
    assert log.sessions == frozenset()  # an ended session's view is let go
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert " c2s s1 VERSION cmd id=0" in lines[0]
    assert "cfg RD1 @0x3d interrupt_pin" in lines[2]
    assert "cfg RD1 @0x3d interrupt_pin = 0xab" in lines[3]


async def test_the_status_line_rewrites_itself_until_cancelled(tmp_path, nursery, autojump_clock):
    server = Server(tmp_path / "server.sock")
    await nursery.start(server.serve)
    out = io.StringIO()
    async with open_proxy(tmp_path / "p.sock", server.path) as proxy:
        with trio.move_on_after(2.5):
            await run_status_line(proxy, out, interval=1.0)
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 3  # two updates, then cleared
    assert "sessions 0/0 | c2s 0 msg 0.0 KiB 0/s" in text
