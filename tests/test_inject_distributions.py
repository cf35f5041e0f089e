"""Delay distributions and the scalar values of rules: parsing, formatting, statistics."""

from __future__ import annotations

import errno
import math
import random
import statistics

import pytest

from vfioproxy.inject import (
    Fixed,
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
)
from vfioproxy.inject.values import (
    format_errno,
    format_rate,
    parse_errno,
    parse_probability,
    parse_range,
    parse_rate,
)

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


def test_describe_shows_text_and_mean():
    assert parse_distribution("uniform(100us,300us)").describe() == (
        "uniform(100us,300us) (mean 200us)"
    )
    assert "infinite" in Pareto(1e-6, 0.5).describe()


def test_same_seed_gives_the_same_draws_and_another_seed_does_not():
    dist = parse_distribution("lognormal(1ms,0.7)+-100us")
    assert draws(dist, seed=7, n=50) == draws(dist, seed=7, n=50)
    assert draws(dist, seed=7, n=50) != draws(dist, seed=8, n=50)
