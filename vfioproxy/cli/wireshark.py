"""``vfioproxy wireshark``: the shipped Lua dissector's path, or installing it."""

from __future__ import annotations

import argparse

from vfioproxy.errors import UsageError
from vfioproxy.usage.exits import EXIT_OK
from vfioproxy.wireshark import dissector_path, install

__all__ = ["add_wireshark_command"]

WIRESHARK_EXAMPLES = """\
examples:
  vfioproxy trace export --format pcapng -o s.pcapng session.trace
  tshark -2 -X lua_script:$(vfioproxy wireshark --path) -r s.pcapng
  vfioproxy wireshark --install          # then: wireshark s.pcapng
  vfioproxy wireshark --install --dest ~/.config/wireshark/plugins --force

--install asks tshark for the personal Lua plugins folder (tshark -G folders;
~/.local/lib/wireshark/plugins without tshark) and prints the file written; a
different vfio_user.lua already there is replaced only with --force. README:
Reading traces, Wireshark."""


def add_wireshark_command(
        commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``wireshark``."""
    parser = commands.add_parser(
        "wireshark", help="the vfio-user dissector for Wireshark/tshark: its path, or install it",
        description="The Lua dissector of vfio-user for the pcapng files trace export "
        "--format pcapng writes.", epilog=WIRESHARK_EXAMPLES)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--path", action="store_true",
                      help="print the path of the shipped dissector (for tshark -X lua_script:)")
    what.add_argument("--install", action="store_true",
                      help="copy the dissector into Wireshark's personal Lua plugins folder")
    parser.add_argument("--dest", metavar="DIR",
                        help="with --install: the folder to copy it into instead")
    parser.add_argument("--force", action="store_true",
                        help="with --install: replace a different vfio_user.lua already there")
    parser.set_defaults(func=cmd_wireshark)


def cmd_wireshark(args: argparse.Namespace) -> int:
    if args.path:
        if args.dest is not None or args.force:
            raise UsageError("--dest and --force go with --install, not --path")
        print(dissector_path())
        return EXIT_OK
    try:
        written = install(args.dest, force=args.force)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    print(f"installed {written}")
    return EXIT_OK
