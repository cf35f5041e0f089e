"""The HTML view in a real browser: headless Chromium loads the page of a
bundled real QEMU capture; the page renders without console output (no
error, no warning, nothing logged), the step table has the realize and reset
steps of realize-steps.md §1.4 with their counts, the script drew a tick per
message, and a screenshot is not blank.

Chromium is driven through its command line (``--dump-dom``,
``--screenshot``, its console on stderr with ``--enable-logging``): no
Python dependency. Without chromium the tests skip with the reason, except
under ``CI`` (``.ci/run`` installs it), where a missing browser fails."""

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from tests.realdata import TRACES
from vfioproxy.cli import main

E1K = TRACES / "qemu-realize-qemu-server-e1000e-001.trace"
#: realize-steps.md §1.4, E1K: commands per step (each got its reply)
E1K_COMMANDS = {
    "R1": 1, "R2": 2, "R3": 1, "R4": 6, "R5": 1, "R6": 1, "R7": 1, "R8": 4, "R9": 4, "R10": 4,
    "R11": 1, "R12": 1, "R13": 2, "R14": 1,
    "S1": 1, "S2": 2, "S3": 1, "S4": 1, "S5": 2, "S6": 6, "S7": 5,
}
#: a browser run's safety net (a hung browser), not an assertion about time
BROWSER_TIMEOUT_S = 180
CONSOLE = re.compile(r":CONSOLE[:(]")


def chromium() -> str:
    """The browser's path; skips (fails under CI) when there is none."""
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                 "google-chrome"))), None)
    if found is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("chromium is missing under CI (.ci/run installs it: apt-get install "
                        "chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return found


def browse(tmp_path, page, *extra):
    """Load ``page`` in headless Chromium with ``extra`` options; its stdout and
    the console lines it logged."""
    done = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1400,1000", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if CONSOLE.search(line)]


class _Tables(HTMLParser):
    """The rows (cell texts) of each table with an id, and the page's tick lines."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.ticks = 0
        self.ready = False
        self._table = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "body":
            self.ready = attributes.get("data-ready") == "1"
        elif tag == "table" and "id" in attributes:
            self._table = self.tables.setdefault(attributes["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ""
        elif tag == "line" and "tick" in (attributes.get("class") or "").split():
            self.ticks += 1

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None


@pytest.fixture
def e1k_page(tmp_path, capsys):
    page = tmp_path / "e1k.html"
    assert main(["trace", "timeline", "--json", "--html", str(page), str(E1K)]) == 0
    return page, capsys.readouterr().out


def test_the_page_of_a_real_realize_renders_its_steps_and_every_message_without_console_output(
        tmp_path, e1k_page):
    page, out = e1k_page
    messages = len(json.loads(out)["sessions"][0]["messages"])
    dom, console = browse(tmp_path, page, "--dump-dom")
    assert console == []
    parsed = _Tables()
    parsed.feed(dom)
    assert parsed.ready
    assert parsed.ticks == messages
    header, *rows = parsed.tables["steps-0"]
    assert header[:3] == ["step", "QEMU step", "msgs"]
    assert [(row[0], int(row[2])) for row in rows] == [
        (step, 2 * count) for step, count in E1K_COMMANDS.items()]
    assert [row[1] for row in rows][:2] == ["version", "DMA listener replay"]


def test_a_screenshot_of_the_page_is_not_blank(tmp_path, e1k_page):
    image = pytest.importorskip("matplotlib.image")
    page, _ = e1k_page
    shot = tmp_path / "shot.png"
    _, console = browse(tmp_path, page, f"--screenshot={shot}")
    assert console == []
    pixels = image.imread(shot)[:, :, :3]
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7].round(2).tolist()}
    assert len(colours) > 20
    assert (pixels.min(axis=2) < 0.9).mean() > 0.05  # more than 5% of it is not white


#: run after the page's own script: hover the first tick, then zoom in on the
#: first timeline, and leave what it saw in the body's data attributes
PROBE = """<script>
const tick = document.querySelector("line.tick");
tick.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: 5, clientY: 5}));
document.body.dataset.tip = document.getElementById("tip").textContent;
const last = Array.from(document.querySelectorAll("#timeline-0 line.tick")).pop();
const before = Number(last.getAttribute("x1"));
const svg = document.querySelector("#timeline-0 svg");
const box = svg.getBoundingClientRect();
svg.dispatchEvent(new WheelEvent("wheel", {deltaY: -100, clientX: box.left + 240,
                                           clientY: box.top + 30, bubbles: true,
                                           cancelable: true}));
document.body.dataset.moved = String(Number(last.getAttribute("x1")) - before);
</script></body>"""


def test_hovering_a_tick_shows_the_message_and_its_qemu_function_and_the_wheel_zooms(
        tmp_path, e1k_page):
    page, out = e1k_page
    first = json.loads(out)["sessions"][0]["messages"][0]
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE, 1))
    dom, console = browse(tmp_path, probed, "--dump-dom")
    assert console == []
    tip = html.unescape(re.search(r'data-tip="([^"]*)"', dom).group(1))
    assert tip.startswith(f"#{first['seq']}  0.000 ms  c2s  id={first['msg_id']}")
    assert first["summary"] in tip
    assert "step R1 — version" in tip
    assert "QEMU: hw/vfio-user/proxy.c:vfio_user_validate_version" in tip
    assert float(re.search(r'data-moved="([^"]*)"', dom).group(1)) > 0  # zoomed in: it moved right


def test_the_page_of_several_sessions_draws_each_and_the_side_by_side_table(tmp_path, capsys):
    page = tmp_path / "two.html"
    lvu = TRACES / "qemu-realize-libvfio-user-server-001.trace"
    assert main(["trace", "timeline", "--html", str(page), str(lvu), str(E1K)]) == 0
    capsys.readouterr()
    dom, console = browse(tmp_path, page, "--dump-dom")
    assert console == []
    parsed = _Tables()
    parsed.feed(dom)
    assert parsed.ready and {"steps-0", "steps-1", "compare"} <= set(parsed.tables)
    header, *rows = parsed.tables["compare"]
    assert header == ["step", "QEMU step", "#1 ms", "#2 ms", "Δ#2 ms"]
    by_step = {row[0]: row for row in rows}
    assert by_step["R10"][2] == "absent" and by_step["R10"][3] != "absent"
    assert [row[0] for row in rows][-2:] == ["between steps", "total"]
    assert parsed.ticks == 82 + 96  # every message of both sessions
