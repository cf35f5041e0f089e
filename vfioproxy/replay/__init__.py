"""Replay recorded vfio-user sessions as client or as server, with divergence reports.

- :func:`replay_client` plays a trace's recorded client against a live server;
- :func:`serve_replay` plays its recorded server towards a live client;
- both return a :class:`ReplayReport` of field-level :class:`Divergence`\\ s;
- :func:`record_session` records a session through the proxy to replay later;
- :mod:`vfioproxy.replay.pytest_plugin` makes it a pytest fixture.
"""

from vfioproxy.replay.client import ClientReplayOptions, replay_client
from vfioproxy.replay.match import DEFAULT_IGNORES, IgnoreRule, Matcher
from vfioproxy.replay.record import realize_client, record_session
from vfioproxy.replay.report import Divergence, FieldDiff, ReplayReport
from vfioproxy.replay.script import ReplayError, Script, load_script
from vfioproxy.replay.server import ServerReplayOptions, serve_replay

__all__ = [
    "DEFAULT_IGNORES",
    "ClientReplayOptions",
    "Divergence",
    "FieldDiff",
    "IgnoreRule",
    "Matcher",
    "ReplayError",
    "ReplayReport",
    "Script",
    "ServerReplayOptions",
    "load_script",
    "realize_client",
    "record_session",
    "replay_client",
    "serve_replay",
]
