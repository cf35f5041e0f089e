"""Latency and fault injection for the proxy, sans-IO.

Rules (:func:`parse_rule`, :func:`load_rules`) say which messages get which
fault; an :class:`Injector` turns each message into a :class:`Decision`
(when to release it, whether to forward it, corrupted bytes, an error reply,
closing) and records every applied action as an :class:`Applied`. Time is a
float of seconds the caller passes in; nothing here sleeps or does I/O.
"""

from vfioproxy.inject.actions import (
    ACTIONS,
    Action,
    Bandwidth,
    Close,
    Corrupt,
    Delay,
    Drop,
    Error,
    Stall,
)
from vfioproxy.inject.distributions import (
    MAX_DELAY,
    Distribution,
    Fixed,
    Jittered,
    LogNormal,
    Normal,
    Pareto,
    Uniform,
    parse_distribution,
)
from vfioproxy.inject.engine import (
    Applied,
    Decision,
    Injector,
    InjectorStatistics,
    IrqDecision,
    RuleStatistics,
)
from vfioproxy.inject.errors import InjectError, RuleSyntaxError
from vfioproxy.inject.rules import Kind, Match, Rule
from vfioproxy.inject.syntax import (
    load_rules,
    load_rules_file,
    loads_rules,
    loads_rules_file,
    parse_rule,
    rule_from_dict,
)
from vfioproxy.inject.values import IntRange, format_duration, parse_duration

__all__ = [
    "ACTIONS",
    "MAX_DELAY",
    "Action",
    "Applied",
    "Bandwidth",
    "Close",
    "Corrupt",
    "Decision",
    "Delay",
    "Distribution",
    "Drop",
    "Error",
    "Fixed",
    "InjectError",
    "Injector",
    "InjectorStatistics",
    "IntRange",
    "IrqDecision",
    "Jittered",
    "Kind",
    "LogNormal",
    "Match",
    "Normal",
    "Pareto",
    "Rule",
    "RuleStatistics",
    "RuleSyntaxError",
    "Stall",
    "Uniform",
    "format_duration",
    "load_rules",
    "load_rules_file",
    "loads_rules",
    "loads_rules_file",
    "parse_distribution",
    "parse_duration",
    "parse_rule",
    "rule_from_dict",
]
