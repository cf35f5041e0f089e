"""``record -Y`` / ``proxy -Y``: the display filter on the live view, through the
proxy with the reference device server and the realize client."""

import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.test_cli_live import VFIOPROXY, spawn, wait_for_socket  # noqa: F401
from vfioproxy.cli import main
from vfioproxy.errors import UsageError
from vfioproxy.trace.filter import FIELDS, compile_filter

#: the time column, which differs between the live view and trace show
TIME = re.compile(r"^( *\d+) +[\d.]+ ")


def realize_through(spawn, tmp_path, *proxy_args):  # noqa: F811
    """Run a realize through ``vfioproxy PROXY_ARGS``; its stdout and stderr."""
    dev, listen = tmp_path / "dev.sock", tmp_path / "p.sock"
    server = spawn("serve-device", "--socket", dev)
    wait_for_socket(dev, server)
    proxy = spawn(*proxy_args, "--listen", listen, "--server", dev)
    wait_for_socket(listen, proxy)
    result = subprocess.run([*VFIOPROXY, "realize", "--socket", str(listen)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    proxy.send_signal(signal.SIGINT)
    out, err = proxy.communicate(timeout=30)
    assert proxy.returncode == 0, err
    return out, err


def test_record_v_y_prints_exactly_the_lines_trace_show_y_prints(spawn, tmp_path,  # noqa: F811
                                                                  capsys):
    trace = tmp_path / "t.trace"
    expr = ("region == CONFIG and dir == c2s and offset < 0x10 and t >= 0"
            " or kind == reply and latency > 0 and command == DEVICE_GET_REGION_INFO")
    out, _ = realize_through(spawn, tmp_path, "record", "-v", "-Y", expr, "-o", trace)
    live = [TIME.sub(r"\1 ", line) for line in out.splitlines()]
    assert main(["trace", "show", "-Y", expr, str(trace)]) == 0
    shown = [TIME.sub(r"\1 ", line) for line in capsys.readouterr().out.splitlines()
             if not line.startswith("#")]
    assert live == shown
    assert any(" DEVICE_GET_REGION_INFO reply " in line for line in live)
    assert any(" REGION_READ cmd " in line and " cfg " in line.lower() for line in live)
    assert main(["trace", "show", str(trace)]) == 0
    every = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert 0 < len(live) < len(every) / 3


def test_proxy_y_implies_v(spawn, tmp_path):  # noqa: F811
    out, _ = realize_through(spawn, tmp_path, "proxy", "-Y", "command == DEVICE_RESET")
    lines = out.splitlines()
    assert lines and all(" DEVICE_RESET " in line for line in lines)
    assert {line.split()[5] for line in lines} == {"cmd", "reply"}


@pytest.mark.parametrize(("expr", "why"), [
    ("step == R7", "step is not known as messages pass: a step label is revised"),
    ("inject", "inject is not known as messages pass: the live view does not see"),
    ("fd.kind == memfd", "fd.kind is not known as messages pass: the proxy passes fds"),
])
def test_fields_the_live_view_cannot_know_are_refused_before_anything_starts(
        tmp_path, capsys, expr, why):
    trace = tmp_path / "t.trace"
    code = main(["record", "-Y", expr, "--listen", str(tmp_path / "p.sock"),
                 "--server", str(tmp_path / "none.sock"), "-o", str(trace)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"vfioproxy record: filter: {why}"), err
    assert "(filter the trace)" in err and len(err.splitlines()) == 1
    assert not trace.exists()


def test_y_with_no_decode_or_a_bad_expression_is_one_line(tmp_path, capsys):
    args = ["--listen", str(tmp_path / "p.sock"), "--server", str(tmp_path / "none.sock")]
    assert main(["proxy", "--no-decode", "-Y", "kind == cmd", *args]) == 2
    assert "--no-decode decodes nothing" in capsys.readouterr().err
    assert main(["proxy", "-Y", "regoin == ROM", *args]) == 2
    assert capsys.readouterr().err == ('vfioproxy proxy: filter: unknown field "regoin" at 0; '
                                       'did you mean "region"?\n')


def test_readme_field_table_says_which_fields_the_live_view_takes():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Display filters\n", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| \w+ \| (yes|no) \|", section, re.MULTILINE)
    assert [name for name, _ in rows] == [f.name for f in FIELDS]
    for name, live in rows:
        expr = f"{name} == 1" if name not in ("violation", "inject", "interpose") else name
        if name in ("dir", "kind", "fd.kind", "register", "step"):
            expr = f'{name} matches "x"'
        if name == "time":
            expr = 'time >= "2026-01-01T00:00:00"'
        if name == "data":
            expr = "data == 0x01"
        if live == "yes":
            compile_filter(expr, live=True)
        else:
            with pytest.raises(UsageError, match=f"filter: {re.escape(name)} is not known"):
                compile_filter(expr, live=True)
