"""Every command's ``--help`` is complete (help text for every option, an
example, the exit codes) and README's command-line reference names exactly
the options each command has, so the two cannot drift apart."""

import argparse
import re
from pathlib import Path

import pytest

from vfioproxy.cli import build_parser, commands, main
from vfioproxy.usage.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

README = Path(__file__).resolve().parent.parent / "README.md"
PARSERS = {parser.prog: parser for parser in commands(build_parser())}
#: a command-line option as a whole word
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def options(parser):
    """The option and positional actions of ``parser`` (not -h, not a sub-command set)."""
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                                  argparse._SubParsersAction))]


def subcommands(parser):
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def reference_entries():
    """README's command-line reference: each synopsis (``vfioproxy ...`` and its
    indented continuation lines) as one string."""
    text = README.read_text()
    section = text.split("## Command-line reference\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 2)[1]
    entries: list[str] = []
    for line in block.splitlines():
        if line.startswith("vfioproxy "):
            entries.append(line)
        else:
            assert line.startswith(" "), line
            entries[-1] += " " + line.strip()
    return entries


ENTRIES = reference_entries()


def entry_of(prog):
    """The reference entry of the command ``prog`` (or of its parent command)."""
    while prog != "vfioproxy":
        for entry in ENTRIES:
            if entry == prog or entry.startswith(prog + " "):
                return entry
        prog = prog.rsplit(" ", 1)[0]
    raise AssertionError("no entry")


@pytest.mark.parametrize("prog", PARSERS)
def test_every_option_and_command_has_help_text(prog):
    parser = PARSERS[prog]
    missing = [a.option_strings or a.dest for a in options(parser) if not a.help]
    for group in subcommands(parser):
        missing += [f"command {c.dest}" for c in group._choices_actions if not c.help]
    assert missing == [], f"{prog}: no help text for {missing}"


@pytest.mark.parametrize("prog", PARSERS)
def test_every_help_has_an_example_and_the_exit_codes(capsys, prog):
    with pytest.raises(SystemExit) as exited:
        main([*prog.split()[1:], "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert re.search(r"^examples?:\n  vfioproxy ", shown, re.MULTILINE), shown
    for code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED):
        assert re.search(rf"^  {code}\s+\w", shown, re.MULTILINE), shown


@pytest.mark.parametrize("prog", [p for p in PARSERS if p != "vfioproxy"])
def test_readme_reference_names_exactly_the_options_of_each_command(prog):
    parser = PARSERS[prog]
    entry = entry_of(prog)
    named = set(OPTION.findall(entry))
    for action in options(parser):
        if action.option_strings:
            assert named & set(action.option_strings), f"README: {prog} lacks {action.dest}"
        else:
            assert (action.metavar or action.dest) in entry, f"README: {prog} lacks {action.dest}"
    if prog.rsplit(" ", 1)[0] != "vfioproxy" and not entry.startswith(prog):
        assert prog.rsplit(" ", 1)[1] in entry  # a sub-command named in its parent's entry
    if entry.startswith(prog):
        known = {s for p in PARSERS.values() if p.prog.startswith(prog)
                 for a in options(p) for s in a.option_strings}
        assert named <= known, f"README names {sorted(named - known)} that {prog} does not have"


def test_readme_lists_the_exit_codes_the_commands_use():
    text = README.read_text().split("## Command-line reference\n", 1)[1]
    for code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED):
        assert f"\n| {code} | " in text
