"""Errors of the fault-injection package."""

from __future__ import annotations

from vfioproxy.errors import VfioProxyError

__all__ = ["InjectError", "RuleSyntaxError"]


class InjectError(VfioProxyError):
    """A rule set cannot be used: unknown or duplicate rule id, unreadable rule file."""


class RuleSyntaxError(InjectError):
    """A rule (text, TOML table or constructor arguments) is not valid.

    Says where: the rule ``text`` and the bad ``token`` with its 0-based
    ``position`` in that text; for rule files also the ``source`` file, the
    1-based ``rule_number`` and the TOML ``key``. Any of them may be ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        token: str | None = None,
        position: int | None = None,
        text: str | None = None,
        source: str | None = None,
        rule_number: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.token = token
        self.position = position
        self.text = text
        self.source = source
        self.rule_number = rule_number
        self.key = key

    def located(
        self,
        *,
        offset: int | None = None,
        text: str | None = None,
        token: str | None = None,
        source: str | None = None,
        rule_number: int | None = None,
        key: str | None = None,
    ) -> RuleSyntaxError:
        """A copy placed in a larger context.

        ``offset`` and ``text`` say that the error was found in a fragment
        starting at ``offset`` of ``text``: the position is shifted (or set to
        ``offset`` when unknown) and ``text`` replaces the fragment. ``token``
        fills in a missing token; the file context fills in where missing.
        """
        position = self.position
        if offset is not None:
            position = offset if position is None else position + offset
        return RuleSyntaxError(
            self.message,
            token=self.token if self.token is not None else token,
            position=position,
            text=text if text is not None else self.text,
            source=self.source if self.source is not None else source,
            rule_number=self.rule_number if self.rule_number is not None else rule_number,
            key=self.key if self.key is not None else key,
        )

    def __str__(self) -> str:
        prefix = ""
        if self.source is not None:
            prefix += f"{self.source}: "
        if self.rule_number is not None:
            prefix += f"rule {self.rule_number}: "
        if self.key is not None:
            prefix += f"key {self.key!r}: "
        text = prefix + self.message
        if self.token is not None:
            text += f": {self.token!r}"
        if self.position is not None:
            text += f" at position {self.position}"
        if self.text is not None:
            text += f" of {self.text!r}"
        return text
