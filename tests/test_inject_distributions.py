"""Delay distributions and the scalar values of rules: parsing, formatting, statistics."""

from __future__ import annotations

import errno
import math
import random
import statistics

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfioproxy.inject import (
    MAX_DELAY,
    Fixed,
    Injector,
    IntRange,
    Jittered,
    LogNormal,
    Normal,
    Pareto,
    RuleSyntaxError,
    Uniform,
    format_duration,
    parse_distribution,
    parse_duration,
    parse_rule,
)
from vfioproxy.inject.distributions import MAX_SIGMA, MIN_ALPHA, capped
from vfioproxy.inject.values import (
    format_errno,
    format_rate,
    parse_errno,
    parse_probability,
    parse_range,
    parse_rate,
)
from vfioproxy.side import Direction

N = 20_000


def draws(dist, seed=1, n=N):
    rng = random.Random(seed)
    return [dist.sample(rng) for _ in range(n)]


# --------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("200us", 200e-6), ("1.5ms", 1.5e-3), ("2s", 2.0), ("250ns", 250e-9), ("3µs", 3e-6),
     ("2e3ns", 2e-6), ("0s", 0.0), (".5s", 0.5)],
)
def test_durations_parse_to_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-15)


@pytest.mark.parametrize(
    "seconds", [200e-6, 1.5e-3, 2.0, 250e-9, 0.0, 1e-10, 123.456, 0.1 + 0.2, 7e-4, 3600.0]
)
def test_formatted_durations_parse_back_exactly(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


def test_durations_format_in_the_largest_unit_that_keeps_them_whole():
    assert format_duration(200e-6) == "200us"
    assert format_duration(0.0015) == "1.5ms"
    assert format_duration(2.0) == "2s"
    assert format_duration(5e-9) == "5ns"


@pytest.mark.parametrize(
    ("text", "token", "position", "message"),
    [
        ("200", "200", 0, "needs a unit"),
        ("200xs", "xs", 3, "unknown duration unit"),
        ("fast", "fast", 0, "expected a duration"),
        ("-5us", "-5us", 0, "expected a duration"),
    ],
)
def test_bad_durations_name_the_token(text, token, position, message):
    with pytest.raises(RuleSyntaxError) as info:
        parse_duration(text)
    assert (info.value.token, info.value.position) == (token, position)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "rate", "canonical"),
    [("10MiB/s", 10 * 2**20, "10MiB/s"), ("500KB/s", 500_000, "500KB/s"),
     ("1000B/s", 1000, "1KB/s"), ("1.5GiB/s", 1.5 * 2**30, "1536MiB/s"),
     ("3B/s", 3, "3B/s"), ("0.5B/s", 0.5, "0.5B/s"), ("2kB/s", 2000, "2KB/s")],
)
def test_rates_parse_and_format_round_trip(text, rate, canonical):
    assert parse_rate(text) == rate
    assert format_rate(rate) == canonical
    assert parse_rate(canonical) == rate


@pytest.mark.parametrize("text", ["10", "10Mb/s", "0B/s", "10MiB"])
def test_bad_rates_are_rejected(text):
    with pytest.raises(RuleSyntaxError):
        parse_rate(text)


def test_ranges_parse_and_format_round_trip():
    assert parse_range("5..10") == IntRange(5, 10)
    assert parse_range("10..") == IntRange(10, None)
    assert parse_range("..0x50") == IntRange(0, 0x50)
    assert parse_range("7") == IntRange(7, 8)
    for text in ["5..10", "10..", "..80", "7", "0.."]:
        assert parse_range(text).to_text() == text
    assert IntRange(0x40, 0x50).to_text(hexadecimal=True) == "0x40..0x50"
    assert 5 in IntRange(5, 10) and 9 in IntRange(5, 10) and 10 not in IntRange(5, 10)
    assert 10**9 in IntRange(3) and 2 not in IntRange(3)


def test_bad_ranges_point_at_the_bad_part():
    with pytest.raises(RuleSyntaxError) as info:
        parse_range("5..x")
    assert (info.value.token, info.value.position) == ("x", 3)
    with pytest.raises(RuleSyntaxError, match="empty range"):
        parse_range("5..5")


def test_errnos_parse_by_name_or_number():
    assert parse_errno("EINVAL") == errno.EINVAL
    assert parse_errno("einval") == errno.EINVAL
    assert parse_errno("22") == 22
    assert parse_errno("0x16") == 22
    assert format_errno(errno.EIO) == "EIO"
    assert format_errno(4000) == "4000"
    with pytest.raises(RuleSyntaxError, match="unknown errno"):
        parse_errno("EWHATEVER")


def test_probabilities_accept_fractions_and_percentages():
    assert parse_probability("0.25") == 0.25
    assert parse_probability("25%") == 0.25
    for bad in ["1.5", "-0.1", "x", "nan"]:
        with pytest.raises(RuleSyntaxError):
            parse_probability(bad)


# --------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "dist"),
    [
        ("fixed(200us)", Fixed(200e-6)),
        ("200us", Fixed(200e-6)),
        ("uniform(100us,300us)", Uniform(100e-6, 300e-6)),
        ("uniform( 100us , 300us )", Uniform(100e-6, 300e-6)),
        ("normal(200us,50us)", Normal(200e-6, 50e-6)),
        ("lognormal(200us,0.5)", LogNormal(200e-6, 0.5)),
        ("pareto(100us,2.5)", Pareto(100e-6, 2.5)),
        ("fixed(200us)+-20us", Jittered(Fixed(200e-6), 20e-6)),
        ("NORMAL(1ms,1us)±2us", Jittered(Normal(1e-3, 1e-6), 2e-6)),
        ("5ms+-1ms", Jittered(Fixed(5e-3), 1e-3)),
    ],
)
def test_distributions_parse_and_round_trip(text, dist):
    assert parse_distribution(text) == dist
    assert parse_distribution(dist.to_text()) == dist


def test_distribution_text_is_canonical():
    assert parse_distribution("uniform( 0.1ms , 300us )+-20000ns").to_text() == (
        "uniform(100us,300us)+-20us"
    )


@pytest.mark.parametrize(
    ("text", "token", "position", "message"),
    [
        ("norml(1us)", "norml", 0, "unknown distribution"),
        ("fixed(1us,2us)", "fixed(1us,2us)", 0, "takes 1 argument"),
        ("normal(1us)", "normal(1us)", 0, "takes 2 argument"),
        ("uniform(1us,2)", "2", 12, "needs a unit"),
        ("lognormal(1us,x)", "x", 14, "expected a number for sigma"),
        ("uniform(3us,2us)", "uniform(3us,2us)", 0, "below low"),
        ("lognormal(0s,1.0)", "lognormal(0s,1.0)", 0, "median must be > 0"),
        ("pareto(1us,0)", "pareto(1us,0)", 0, "alpha must be > 0"),
        ("fixed(1us)+-1", "1", 12, "needs a unit"),
        ("fixed(1us)+-0us", "0us", 12, "jitter must be > 0"),
        ("fixed(1us", "fixed(1us", 0, "missing ')'"),
        ("slow", "slow", 0, "expected a distribution"),
    ],
)
def test_bad_distributions_name_token_and_position(text, token, position, message):
    with pytest.raises(RuleSyntaxError) as info:
        parse_distribution(text)
    assert message in str(info.value)
    assert (info.value.token, info.value.position) == (token, position)


def test_distribution_constructors_validate_their_parameters():
    with pytest.raises(RuleSyntaxError):
        Fixed(-1.0)
    with pytest.raises(RuleSyntaxError):
        Normal(1e-3, math.inf)
    with pytest.raises(RuleSyntaxError, match="one base distribution"):
        Jittered(Jittered(Fixed(1.0), 0.1), 0.1)  # type: ignore[arg-type]


# --------------------------------------------------------------------- statistics


def assert_mean_sd(values, mean, sd):
    n = len(values)
    assert statistics.fmean(values) == pytest.approx(mean, abs=5 * sd / math.sqrt(n) + 1e-15)
    assert statistics.pstdev(values) == pytest.approx(sd, rel=0.04, abs=1e-15)


def test_fixed_always_draws_its_value():
    assert set(draws(Fixed(200e-6), n=100)) == {200e-6}
    assert Fixed(200e-6).mean() == 200e-6


def test_uniform_draws_have_the_expected_mean_and_sd():
    dist = Uniform(100e-6, 300e-6)
    values = draws(dist)
    assert min(values) >= 100e-6 and max(values) <= 300e-6
    assert_mean_sd(values, dist.mean(), 200e-6 / math.sqrt(12))
    assert dist.mean() == pytest.approx(200e-6)


def test_normal_draws_have_the_expected_mean_and_sd():
    dist = Normal(200e-6, 50e-6)
    values = draws(dist)
    assert_mean_sd(values, 200e-6, 50e-6)
    assert dist.mean() == pytest.approx(200e-6, rel=1e-5)  # the clamp at 4 sd adds a hair


def test_lognormal_is_parameterised_by_median_and_sigma_of_the_log():
    dist = LogNormal(200e-6, 0.5)
    values = draws(dist)
    assert statistics.median(values) == pytest.approx(200e-6, rel=0.03)
    logs = [math.log(v) for v in values]
    assert_mean_sd(logs, math.log(200e-6), 0.5)
    assert dist.mean() == pytest.approx(200e-6 * math.exp(0.125))
    assert statistics.fmean(values) == pytest.approx(dist.mean(), rel=0.02)


def test_pareto_draws_start_at_the_scale_and_have_the_expected_mean():
    dist = Pareto(100e-6, 3.0)
    values = draws(dist)
    assert min(values) >= 100e-6
    assert dist.mean() == pytest.approx(150e-6)
    assert statistics.fmean(values) == pytest.approx(150e-6, rel=0.03)
    assert statistics.median(values) == pytest.approx(100e-6 * 2 ** (1 / 3), rel=0.03)
    assert Pareto(100e-6, 1.0).mean() == math.inf


def test_jitter_adds_uniform_noise_around_the_base():
    dist = Jittered(Fixed(200e-6), 20e-6)
    values = draws(dist)
    assert min(values) >= 180e-6 and max(values) <= 220e-6
    assert_mean_sd(values, 200e-6, 20e-6 / math.sqrt(3))
    assert dist.mean() == pytest.approx(200e-6)


@pytest.mark.parametrize(
    "text",
    ["normal(100us,100us)", "fixed(10us)+-20us", "uniform(0us,10us)+-5us",
     "lognormal(10us,1.0)+-10us", "normal(10us,20us)+-15us", "pareto(5us,3.0)+-10us"],
)
def test_draws_are_clamped_at_zero_and_mean_includes_the_clamp(text):
    dist = parse_distribution(text)
    values = draws(dist, n=40_000)
    assert min(values) == 0.0
    sd = statistics.pstdev(values)
    assert statistics.fmean(values) == pytest.approx(dist.mean(), abs=5 * sd / math.sqrt(40_000))


def test_mean_of_a_clamped_fixed_jitter_is_exact():
    # E[max(0, 10us + U(-20us, 20us))] = 10us + (20us - 10us)**2 / (4 * 20us)
    assert parse_distribution("fixed(10us)+-20us").mean() == pytest.approx(11.25e-6, rel=1e-9)


def _erf_cdf(z: float) -> float:
    """The closed form the normal CDF had before statistics.NormalDist."""
    return (1 + math.erf(z / math.sqrt(2))) / 2


def _erf_pdf(z: float) -> float:
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


@settings(max_examples=300, deadline=None)
@given(
    mu=st.floats(0.0, 1.0),
    sd=st.floats(1e-9, 1.0),
    x=st.floats(0.0, 2.0),
    sigma=st.floats(1e-3, MAX_SIGMA),
)
def test_normal_and_lognormal_cdf_and_mean_equal_the_erf_closed_forms(mu, sd, x, sigma):
    assert Normal(mu, sd).cdf(x) == pytest.approx(_erf_cdf((x - mu) / sd), rel=1e-9, abs=1e-15)
    z = mu / sd
    assert Normal(mu, sd).mean() == pytest.approx(
        mu * _erf_cdf(z) + sd * _erf_pdf(z), rel=1e-12, abs=1e-300)
    median = max(mu, 1e-9)
    if x > 0:
        assert LogNormal(median, sigma).cdf(x) == pytest.approx(
            _erf_cdf((math.log(x) - math.log(median)) / sigma), rel=1e-9, abs=1e-15)


def test_normal_cdf_puts_the_mass_below_zero_at_zero_and_steps_without_spread():
    dist = Normal(1e-3, 1e-4)
    assert dist.cdf(1e-3) == 0.5 and dist.cdf(-1e-9) == 0.0
    assert dist.cdf(1.2e-3) == pytest.approx(0.9772498680518208, rel=1e-12)
    assert Normal(1e-3, 0.0).cdf(1e-3) == 1.0 and Normal(1e-3, 0.0).cdf(0.99e-3) == 0.0
    assert LogNormal(1e-3, 0.5).cdf(1e-3) == 0.5 and LogNormal(1e-3, 0.5).cdf(0.0) == 0.0


def test_describe_shows_text_and_mean():
    assert parse_distribution("uniform(100us,300us)").describe() == (
        "uniform(100us,300us) (mean 200us)"
    )
    assert "infinite" in Pareto(1e-6, 0.5).describe()


def test_same_seed_gives_the_same_draws_and_another_seed_does_not():
    dist = parse_distribution("lognormal(1ms,0.7)+-100us")
    assert draws(dist, seed=7, n=50) == draws(dist, seed=7, n=50)
    assert draws(dist, seed=7, n=50) != draws(dist, seed=8, n=50)


# --------------------------------------------------------------------- safe draws

#: per kind: the parameters in text order, "d" a duration, "f" a plain number
KINDS = {
    "fixed": (("value", "d"),),
    "uniform": (("low", "d"), ("high", "d")),
    "normal": (("mean", "d"), ("sd", "d")),
    "lognormal": (("median", "d"), ("sigma", "f")),
    "pareto": (("scale", "d"), ("alpha", "f")),
}
#: parameters that must be above zero (the others may be zero)
POSITIVE = {"median", "scale", "jitter"}

EDGES = [0.0, 5e-324, 1e-300, 1e-9, MIN_ALPHA, math.nextafter(MIN_ALPHA, 0), MAX_SIGMA,
         math.nextafter(MAX_SIGMA, math.inf), MAX_DELAY, math.nextafter(MAX_DELAY, math.inf),
         1e300, 1.7e308]
numbers = st.one_of(
    st.sampled_from(EDGES),
    st.floats(0, 10),
    st.floats(0, 1e-3),
    st.floats(0, 1e308),
)


def accepted(label, value):
    """Whether the module docstring's ranges admit ``value`` for parameter ``label``."""
    if label == "sigma":
        return 0 <= value <= MAX_SIGMA
    if label == "alpha":
        return value >= MIN_ALPHA
    return (value > 0 if label in POSITIVE else value >= 0) and value <= MAX_DELAY


@st.composite
def distribution_texts(draw):
    """Any distribution text with any numbers, and its parameters by name."""
    kind = draw(st.sampled_from(sorted(KINDS)))
    params = {label: draw(numbers) for label, _ in KINDS[kind]}
    pieces = [f"{params[label]!r}{'s' if unit == 'd' else ''}" for label, unit in KINDS[kind]]
    text = f"{kind}({','.join(pieces)})"
    if draw(st.booleans()):
        params["jitter"] = draw(numbers)
        text += f"+-{params['jitter']!r}s"
    return text, params


class Extremes(random.Random):
    """``random()`` returns the chosen values in [0, 1) first, then ordinary draws."""

    def __init__(self, values, seed):
        super().__init__(seed)
        self.values = list(values)

    def random(self):
        return self.values.pop() if self.values else super().random()


unit_interval = st.one_of(
    st.sampled_from([0.0, 2**-53, 0.5, 1 - 2**-53]), st.floats(0, 1, exclude_max=True)
)

SAFE = settings(deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow])


@SAFE
@given(distribution_texts(), st.integers(0, 2**32), st.lists(unit_interval, max_size=64))
def test_any_distribution_is_refused_when_parsed_or_draws_within_the_cap(case, seed, extremes):
    text, params = case
    offending = [label for label, value in params.items() if not accepted(label, value)]
    inverted = "high" in params and params["high"] < params["low"]
    try:
        dist = parse_distribution(text)
    except RuleSyntaxError as exc:
        message = str(exc)
        assert "\n" not in message
        assert offending or inverted, f"{text} refused: {message}"
        assert any(f"{label} must be" in message for label in offending) or (
            inverted and "below low" in message
        ), message
        return
    assert not offending and not inverted, f"{text} accepted"
    rng = Extremes(extremes, seed)
    for _ in range(2000):
        value = dist.sample(rng)
        assert 0.0 <= value <= MAX_DELAY, (text, value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("pareto(1us,0.0001)", ["alpha", "at least 0.1"]),
        ("pareto(1us,0.0999)", ["alpha", "at least 0.1"]),
        ("lognormal(1ms,20.5)", ["sigma", "between 0 and 20"]),
        ("lognormal(3601s,1.0)", ["median", "at most 3600s"]),
        ("fixed(3600.5s)", ["value", "between 0s and 3600s"]),
        ("3601s", ["value", "between 0s and 3600s"]),
        ("uniform(0s,1e9s)", ["high", "between 0s and 3600s"]),
        ("normal(1ms,4000s)", ["sd", "between 0s and 3600s"]),
        ("normal(5000s,1ms)", ["mean", "between 0s and 3600s"]),
        ("pareto(1e300s,2.0)", ["scale", "at most 3600s"]),
        ("fixed(1ms)+-1e6s", ["jitter", "at most 3600s"]),
    ],
)
def test_parameters_whose_draws_can_overflow_are_refused_naming_them(text, words):
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule(f"c2s * delay {text}")
    message = str(info.value)
    assert all(word in message for word in words), message
    assert "\n" not in message


def test_the_largest_accepted_parameters_draw_within_the_cap_at_the_extremes():
    edges = [0.0, 2**-53, 1 - 2**-53] * 20
    for text in ["pareto(3600s,0.1)", "pareto(5e-324s,0.1)", "lognormal(3600s,20.0)",
                 "lognormal(5e-324s,20.0)", "normal(3600s,3600s)", "uniform(3600s,3600s)",
                 "pareto(3600s,0.1)+-3600s", "lognormal(1ns,20.0)+-1ns"]:
        dist = parse_distribution(text)
        rng = Extremes(edges, 1)
        values = [dist.sample(rng) for _ in range(500)]
        assert all(0.0 <= value <= MAX_DELAY for value in values), text
    largest = parse_distribution("pareto(1ms,0.1)").draw(Extremes([1 - 2**-53], 1))
    assert largest == pytest.approx(1e-3 * 2.0**530) and largest > MAX_DELAY


def test_capped_cuts_draws_to_max_delay_and_says_so():
    assert capped(1.5) == (1.5, "")
    assert capped(MAX_DELAY) == (MAX_DELAY, "")
    assert capped(7200.0) == (MAX_DELAY, "drew 7200s: capped at MAX_DELAY (3600s)")
    value, note = capped(math.inf)
    assert value == MAX_DELAY and "beyond a float's range" in note


def test_a_capped_delay_is_applied_as_max_delay_with_a_note():
    injector = Injector(["c2s * delay pareto(1ms,0.1)"], seed=4)
    reset = bytes.fromhex("0100 0d00 10000000 00000000 00000000".replace(" ", ""))
    records = [injector.decide(0, Direction.C2S, reset, 0.0).applied[0] for _ in range(200)]
    cut = [record for record in records if record.note]
    assert 10 < len(cut) < 100  # P(draw > 3600 s) = (1e-3 / 3600) ** 0.1, about 0.22
    assert all(record.value == MAX_DELAY and "capped at MAX_DELAY" in record.note
               for record in cut)
    assert all(record.value < MAX_DELAY for record in records if not record.note)
    assert injector.statistics().rule(1).injected_delay <= 200 * MAX_DELAY
