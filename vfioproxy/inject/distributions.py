"""Delay distributions: what an injected latency is drawn from.

Text syntax (parsed by :func:`parse_distribution`, produced by ``to_text``)::

    fixed(200us)               always 200 us; a bare duration (200us) means the same
    uniform(100us,300us)       uniform between low and high
    normal(200us,50us)         normal with mean 200 us, standard deviation 50 us
    lognormal(200us,0.5)       log-normal with median 200 us, sigma 0.5
    pareto(100us,2.5)          Pareto with scale (minimum) 100 us, shape alpha 2.5
    fixed(200us)+-20us         any of the above plus uniform jitter in [-20us, +20us]

Durations need a unit (``ns``, ``us``, ``ms``, ``s``). ``lognormal(median,
sigma)``: the natural log of a draw is normal with mean ``ln(median)`` and
standard deviation ``sigma`` (so the mean is ``median * exp(sigma**2 / 2)``).
``pareto(scale,alpha)``: draws are ``scale * U**(-1/alpha)``, never below
``scale``; the mean is finite only for ``alpha > 1``.

Accepted parameters, checked when a distribution is built (so when a rule
is parsed), each refused with a :class:`RuleSyntaxError` naming it and its
range: every duration (value, low, high, mean, sd, median, scale, jitter)
between 0 and :data:`MAX_DELAY` (median, scale and jitter above 0);
``sigma`` between 0 and :data:`MAX_SIGMA`; ``alpha`` at least
:data:`MIN_ALPHA`. Within those, every draw ``random.Random`` can make
stays a finite float.

Draws are never negative: a normal draw, or a draw plus jitter, below zero
becomes zero. They never exceed :data:`MAX_DELAY` either: :meth:`draw`
gives the value before that cap (never raising, ``inf`` past a float's
range) and :meth:`sample` the value after it; :func:`capped` applies the
cap and says when it bit. :meth:`mean` is the mean of the draws with the
clamp at zero included but not the cap, and ``inf`` where the mean does not
exist (Pareto with ``alpha <= 1``).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import attrs

from vfioproxy.inject.errors import RuleSyntaxError
from vfioproxy.inject.values import format_duration, parse_duration, parse_float

__all__ = [
    "MAX_DELAY",
    "MAX_SIGMA",
    "MIN_ALPHA",
    "BaseDistribution",
    "Distribution",
    "Fixed",
    "Jittered",
    "LogNormal",
    "Normal",
    "Pareto",
    "Uniform",
    "capped",
    "parse_distribution",
]

#: the longest delay one draw adds, in seconds: longer draws are cut to it
MAX_DELAY = 3600.0
#: the largest lognormal sigma: the largest normal draw ``random`` makes
#: (about 12.2 sd) keeps ``median * exp(12.2 * sigma)`` and the mean
#: ``median * exp(sigma**2 / 2)`` finite
MAX_SIGMA = 20.0
#: the smallest Pareto alpha: the largest draw, ``scale * 2**(53 / alpha)``
#: (``random()`` steps by 2**-53), stays finite
MIN_ALPHA = 0.1
#: ``exp`` of anything below this is a finite float
_LOG_FLOAT_MAX = 709.0


def capped(draw: float) -> tuple[float, str]:
    """A :meth:`draw` cut to :data:`MAX_DELAY`, and a note when it was (else "")."""
    if draw <= MAX_DELAY:
        return draw, ""
    shown = f"{draw:.4g}s" if math.isfinite(draw) else "a value beyond a float's range"
    return MAX_DELAY, f"drew {shown}: capped at MAX_DELAY ({format_duration(MAX_DELAY)})"


def _shown(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        return format_duration(value)
    return repr(value)


def _in_range(
    low: float, high: float, accepted: str, *, open_low: bool = False, duration: bool = True
) -> Callable[[Any, attrs.Attribute[float], float], None]:
    """A validator accepting ``low <= value <= high`` (``low < value`` when ``open_low``).

    The error names the distribution, the parameter (its ``label`` metadata,
    else its name) and the ``accepted`` range.
    """

    def validate(instance: Any, attribute: attrs.Attribute[float], value: float) -> None:
        if (
            isinstance(value, (int, float))
            and (low < value if open_low else low <= value)
            and value <= high
        ):
            return
        label = attribute.metadata.get("label", attribute.name)
        got = _shown(value) if duration else repr(value)
        raise RuleSyntaxError(f"{instance.name}: {label} must be {accepted}, got {got}")

    return validate


_CAP = f"{format_duration(MAX_DELAY)} (MAX_DELAY)"
_duration = _in_range(0.0, MAX_DELAY, f"between 0s and {_CAP}")
_positive_duration = _in_range(0.0, MAX_DELAY, f"> 0 and at most {_CAP}", open_low=True)


#: the standard normal: its ``pdf`` and ``cdf`` serve the normal and log-normal formulas
_STANDARD_NORMAL = statistics.NormalDist()


class _Drawing(Protocol):
    def draw(self, rng: random.Random) -> float: ...

    def mean(self) -> float: ...

    def to_text(self) -> str: ...


class _Drawn:
    """What every distribution does the same way: the capped sample and the description."""

    __slots__ = ()

    def sample(self: _Drawing, rng: random.Random) -> float:
        """One draw in seconds, between 0 and :data:`MAX_DELAY`; never raises."""
        value = self.draw(rng)
        return value if value <= MAX_DELAY else MAX_DELAY

    def describe(self: _Drawing) -> str:
        """``to_text()`` and the mean to 6 significant digits, for people."""
        mean = self.mean()
        shown = format_duration(float(f"{mean:.6g}")) if math.isfinite(mean) else "infinite"
        return f"{self.to_text()} (mean {shown})"


@attrs.frozen
class Fixed(_Drawn):
    """Always ``value`` seconds."""

    value: float = attrs.field(converter=float, validator=_duration)
    name: ClassVar[str] = "fixed"

    def draw(self, rng: random.Random) -> float:
        """One draw in seconds before the cap (uses no randomness)."""
        return self.value

    def mean(self) -> float:
        return self.value

    def cdf(self, x: float) -> float:
        """P(draw <= x)."""
        return 1.0 if x >= self.value else 0.0

    def breaks(self) -> tuple[float, ...]:
        """Points where :meth:`cdf` is not smooth."""
        return (self.value,)

    def to_text(self) -> str:
        return f"fixed({format_duration(self.value)})"


def _above_low(instance: Uniform, attribute: attrs.Attribute[float], value: float) -> None:
    _duration(instance, attribute, value)
    if value < instance.low:
        raise RuleSyntaxError(
            f"uniform: high ({format_duration(value)}) is below low "
            f"({format_duration(instance.low)})"
        )


@attrs.frozen
class Uniform(_Drawn):
    """Uniform between ``low`` and ``high`` seconds."""

    low: float = attrs.field(converter=float, validator=_duration)
    high: float = attrs.field(converter=float, validator=_above_low)
    name: ClassVar[str] = "uniform"

    def draw(self, rng: random.Random) -> float:
        """One draw in seconds before the cap."""
        return rng.uniform(self.low, self.high)

    def mean(self) -> float:
        return (self.low + self.high) / 2

    def cdf(self, x: float) -> float:
        """P(draw <= x)."""
        if x >= self.high:
            return 1.0
        if x < self.low:
            return 0.0
        return (x - self.low) / (self.high - self.low)

    def breaks(self) -> tuple[float, ...]:
        """Points where :meth:`cdf` is not smooth."""
        return (self.low, self.high)

    def to_text(self) -> str:
        return f"uniform({format_duration(self.low)},{format_duration(self.high)})"


@attrs.frozen
class Normal(_Drawn):
    """Normal with mean ``mu`` and standard deviation ``sd`` (seconds), clamped at 0."""

    mu: float = attrs.field(converter=float, validator=_duration, metadata={"label": "mean"})
    sd: float = attrs.field(converter=float, validator=_duration)
    name: ClassVar[str] = "normal"

    def draw(self, rng: random.Random) -> float:
        """One draw in seconds before the cap."""
        return max(0.0, rng.normalvariate(self.mu, self.sd))

    def mean(self) -> float:
        """``E[max(0, X)]``; equals ``mu`` unless ``sd`` is a good part of ``mu``."""
        if self.sd == 0:
            return self.mu
        z = self.mu / self.sd
        return self.mu * _STANDARD_NORMAL.cdf(z) + self.sd * _STANDARD_NORMAL.pdf(z)

    def cdf(self, x: float) -> float:
        """P(draw <= x), the mass below zero sitting at zero."""
        if x < 0:
            return 0.0
        if self.sd == 0:
            return 1.0 if x >= self.mu else 0.0
        return statistics.NormalDist(self.mu, self.sd).cdf(x)

    def breaks(self) -> tuple[float, ...]:
        """Points where :meth:`cdf` is not smooth."""
        return (0.0, self.mu) if self.sd == 0 else (0.0,)

    def to_text(self) -> str:
        return f"normal({format_duration(self.mu)},{format_duration(self.sd)})"


@attrs.frozen
class LogNormal(_Drawn):
    """Log-normal: ``ln(draw)`` is normal with mean ``ln(median)`` and sd ``sigma``."""

    median: float = attrs.field(converter=float, validator=_positive_duration)
    sigma: float = attrs.field(
        converter=float,
        validator=_in_range(0.0, MAX_SIGMA, f"between 0 and {MAX_SIGMA:g}", duration=False),
    )
    name: ClassVar[str] = "lognormal"

    def draw(self, rng: random.Random) -> float:
        """One draw in seconds before the cap (``rng.lognormvariate``, never overflowing)."""
        exponent = rng.normalvariate(math.log(self.median), self.sigma)
        return math.exp(exponent) if exponent < _LOG_FLOAT_MAX else math.inf

    def mean(self) -> float:
        """``median * exp(sigma**2 / 2)``."""
        return self.median * math.exp(self.sigma**2 / 2)

    def cdf(self, x: float) -> float:
        """P(draw <= x)."""
        if x <= 0:
            return 0.0
        if self.sigma == 0:
            return 1.0 if x >= self.median else 0.0
        return statistics.NormalDist(math.log(self.median), self.sigma).cdf(math.log(x))

    def breaks(self) -> tuple[float, ...]:
        """Points where :meth:`cdf` is not smooth."""
        return (self.median,) if self.sigma == 0 else ()

    def to_text(self) -> str:
        return f"lognormal({format_duration(self.median)},{self.sigma!r})"


def _alpha(instance: Pareto, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, (int, float)) and MIN_ALPHA <= value < math.inf):
        raise RuleSyntaxError(
            f"pareto: alpha must be > 0, at least {MIN_ALPHA:g} (a smaller alpha draws "
            f"values beyond a float's range), got {value!r}"
        )


@attrs.frozen
class Pareto(_Drawn):
    """Pareto with minimum ``scale`` seconds and shape ``alpha``."""

    scale: float = attrs.field(converter=float, validator=_positive_duration)
    alpha: float = attrs.field(converter=float, validator=_alpha)
    name: ClassVar[str] = "pareto"

    def draw(self, rng: random.Random) -> float:
        """One draw in seconds before the cap (``scale * rng.paretovariate(alpha)``,
        never overflowing)."""
        u = 1.0 - rng.random()
        if u <= 0.0:
            return math.inf
        exponent = -1.0 / self.alpha
        grows = math.log(u) * exponent
        if grows < _LOG_FLOAT_MAX:
            return self.scale * math.pow(u, exponent)
        total = math.log(self.scale) + grows
        return math.exp(total) if total < _LOG_FLOAT_MAX else math.inf

    def mean(self) -> float:
        """``alpha * scale / (alpha - 1)``; ``inf`` for ``alpha <= 1``."""
        if self.alpha <= 1:
            return math.inf
        return self.alpha * self.scale / (self.alpha - 1)

    def cdf(self, x: float) -> float:
        """P(draw <= x)."""
        if x < self.scale:
            return 0.0
        return 1.0 - math.pow(self.scale / x, self.alpha)

    def breaks(self) -> tuple[float, ...]:
        """Points where :meth:`cdf` is not smooth."""
        return (self.scale,)

    def to_text(self) -> str:
        return f"pareto({format_duration(self.scale)},{self.alpha!r})"


BaseDistribution = Fixed | Uniform | Normal | LogNormal | Pareto

#: 5-point Gauss-Legendre nodes and weights on [-1, 1]
_GL_NODES = (
    (0.0, 128 / 225),
    (-0.5384693101056831, 0.4786286704993665),
    (0.5384693101056831, 0.4786286704993665),
    (-0.9061798459386640, 0.2369268850561891),
    (0.9061798459386640, 0.2369268850561891),
)
_GL_STEPS = 64


def _integrate(f: Callable[[float], float], low: float, high: float) -> float:
    """Integral of ``f`` over [low, high] (composite Gauss-Legendre, interior nodes only)."""
    width = (high - low) / _GL_STEPS
    total = 0.0
    for step in range(_GL_STEPS):
        mid = low + (step + 0.5) * width
        total += sum(w * f(mid + x * width / 2) for x, w in _GL_NODES)
    return total * width / 2


def _not_jittered(instance: Jittered, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, (Fixed, Uniform, Normal, LogNormal, Pareto)):
        raise RuleSyntaxError(f"jitter applies to one base distribution, got {value!r}")


@attrs.frozen
class Jittered(_Drawn):
    """``base`` plus uniform jitter in ``[-jitter, +jitter]`` seconds, clamped at 0."""

    base: BaseDistribution = attrs.field(validator=_not_jittered)
    jitter: float = attrs.field(converter=float, validator=_positive_duration)
    name: ClassVar[str] = "jitter"

    def draw(self, rng: random.Random) -> float:
        """One draw in seconds before the cap: the base draw first, then the jitter draw."""
        return max(0.0, self.base.draw(rng) + rng.uniform(-self.jitter, self.jitter))

    def mean(self) -> float:
        """The base mean plus what the clamp at zero adds back.

        ``E[max(0, B + J)] = E[B] + ∫₀ʲ F_B(b)·(j - b)/(2j) db`` for a base
        ``B >= 0`` with distribution function ``F_B``; computed numerically,
        split at the base's break points.
        """
        mean = self.base.mean()
        if not math.isfinite(mean):
            return mean
        j = self.jitter
        cuts = sorted({0.0, j, *(b for b in self.base.breaks() if 0.0 < b < j)})

        def integrand(b: float) -> float:
            return self.base.cdf(b) * (j - b) / (2 * j)

        return mean + sum(_integrate(integrand, lo, hi) for lo, hi in itertools.pairwise(cuts))

    def to_text(self) -> str:
        return f"{self.base.to_text()}+-{format_duration(self.jitter)}"


Distribution = Fixed | Uniform | Normal | LogNormal | Pareto | Jittered

#: argument kinds per distribution name: "d" duration, "f" plain number
_SIGNATURES: dict[str, tuple[type[BaseDistribution], str, tuple[str, ...]]] = {
    "fixed": (Fixed, "d", ("value",)),
    "uniform": (Uniform, "dd", ("low", "high")),
    "normal": (Normal, "dd", ("mean", "sd")),
    "lognormal": (LogNormal, "df", ("median", "sigma")),
    "pareto": (Pareto, "df", ("scale", "alpha")),
}


def _jitter_split(text: str) -> int:
    """Position of a ``+-`` (or ``±``) outside parentheses, or -1."""
    depth = 0
    for pos, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif depth == 0 and (text.startswith("+-", pos) or char == "±"):
            return pos
    return -1


def parse_distribution(text: str) -> Distribution:
    """Parse ``normal(200us,50us)+-10us`` and friends (see the module docstring).

    Errors are :class:`RuleSyntaxError` with the position inside ``text``.
    """
    split = _jitter_split(text)
    if split < 0:
        return _parse_base(text)
    base = _parse_base(text[:split])
    skip = 1 if text[split] == "±" else 2
    jitter_text = text[split + skip :]
    try:
        return Jittered(base, parse_duration(jitter_text.strip()))
    except RuleSyntaxError as exc:
        raise exc.located(offset=split + skip, token=jitter_text) from None


def _parse_base(text: str) -> BaseDistribution:
    open_at = text.find("(")
    if open_at < 0:
        try:
            return Fixed(parse_duration(text.strip()))
        except RuleSyntaxError as exc:
            hint = "expected a distribution such as fixed(100us) or normal(200us,50us)"
            if text[:1].isalpha():
                raise RuleSyntaxError(hint, token=text, position=0) from None
            raise exc.located(offset=0, token=text) from None
    name = text[:open_at].strip().lower()
    signature = _SIGNATURES.get(name)
    if signature is None:
        known = ", ".join(_SIGNATURES)
        raise RuleSyntaxError(
            f"unknown distribution (known: {known})", token=text[:open_at], position=0
        )
    cls, kinds, labels = signature
    if not text.endswith(")"):
        raise RuleSyntaxError("missing ')' after the arguments", token=text, position=0)
    inner = text[open_at + 1 : -1]
    args: list[float] = []
    start = open_at + 1
    pieces = inner.split(",") if inner.strip() else []
    if len(pieces) != len(kinds):
        raise RuleSyntaxError(
            f"{name} takes {len(kinds)} argument(s) ({', '.join(labels)}), got {len(pieces)}",
            token=text,
            position=0,
        )
    for piece, kind, label in zip(pieces, kinds, labels, strict=True):
        stripped = piece.strip()
        offset = start + piece.find(stripped[:1]) if stripped else start
        try:
            args.append(parse_duration(stripped) if kind == "d" else parse_float(stripped, label))
        except RuleSyntaxError as exc:
            raise exc.located(offset=offset) from None
        start += len(piece) + 1
    try:
        return cls(*args)
    except RuleSyntaxError as exc:
        raise exc.located(offset=0, token=text) from None
