"""``-o`` means the same for every verb: ``DIR/`` (or an existing directory) is a
directory, any other path a file; nothing existing is replaced or mixed
without ``--force``, and ``--force`` on a directory clears only the verb's own
outputs."""

import json

from recorder.reader import TraceReader
from recorder.records import MessageRecord
from tests.realdata import RAWCAP
from tests.test_cli_errors import one_error_line, run


def messages(path):
    with TraceReader(path) as reader:
        return sum(isinstance(r, MessageRecord) for r in reader)


def test_demo_twice_replaces_its_own_default_trace(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "demo", "--workload", "1")[0] == 0
    first = messages(tmp_path / "demo.trace")
    code, out, _ = run(capsys, "demo", "--workload", "3")
    assert code == 0 and "to demo.trace;" in out
    assert messages(tmp_path / "demo.trace") > first  # the second demo's, not both
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.trace"]


def test_demo_never_replaces_an_explicit_output_without_force(capsys, tmp_path):
    mine = tmp_path / "mine.trace"
    mine.write_bytes(b"keep me")
    code, _, err = run(capsys, "demo", "-o", mine)
    assert code == 2
    assert one_error_line(err) == f"vfioproxy demo: {mine} already exists (--force replaces it)"
    assert mine.read_bytes() == b"keep me"
    assert run(capsys, "demo", "--workload", "1", "-o", mine, "--force")[0] == 0
    assert messages(mine) > 0


def test_demo_into_a_directory_writes_a_new_file_there_each_time(capsys, tmp_path):
    out = tmp_path / "d"
    for expected in ("demo.trace", "demo-2.trace"):
        code, printed, _ = run(capsys, "demo", "--workload", "1", "-o", f"{out}/")
        assert code == 0 and f"to {out / expected};" in printed
    code, printed, _ = run(capsys, "demo", "--workload", "1", "-o", out)  # existing: a directory
    assert code == 0 and f"to {out / 'demo-3.trace'};" in printed
    assert sorted(p.name for p in out.iterdir()) == ["demo-2.trace", "demo-3.trace", "demo.trace"]


def test_experiment_rerun_is_refused_and_force_clears_only_its_own_outputs(capsys, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["experiment", "--runs", "1", "--no-plot", "-o", out]
    assert run(capsys, *argv, "--sweep", "c2s * delay fixed({0,1}us)")[0] == 0
    assert len(list((out / "traces").iterdir())) == 2
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert one_error_line(err) == (f"vfioproxy experiment: {out} holds the output of an earlier "
                                   "run (results.csv, results.json, traces); --force replaces it")
    assert len(list((out / "traces").iterdir())) == 2
    assert run(capsys, *argv, "--force")[0] == 0
    assert [p.name for p in (out / "traces").iterdir()] == ["00-proxy-1.trace"]  # old ones gone
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_trace_import_into_a_file_or_a_directory_never_replaces_without_force(capsys, tmp_path):
    source = RAWCAP / "qemu-realize-gpio-001.jsonl"
    target = tmp_path / "one.trace"
    assert run(capsys, "trace", "import", source, target)[0] == 0
    before = target.read_bytes()
    code, _, err = run(capsys, "trace", "import", source, target)
    assert code == 2
    assert one_error_line(err) == (f"vfioproxy trace import: {target} already exists "
                                   "(--force replaces it)")
    assert target.read_bytes() == before
    assert run(capsys, "trace", "import", source, target, "--force")[0] == 0
    code, _, err = run(capsys, "trace", "import", source, source, target)
    assert code == 2
    assert one_error_line(err) == (f"vfioproxy trace import: {target} is a file: several sources "
                                   "need a directory, DEST/")
    code, _, _ = run(capsys, "trace", "import", source, f"{tmp_path}/new/")
    assert code == 0 and messages(tmp_path / "new" / f"{source.stem}.trace") > 0
