"""``vfioproxy experiment`` plots (matplotlib keeps its font files open: no fd check here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfioproxy.experiment import ExperimentConfig, run_experiment
from vfioproxy.experiment.plot import have_matplotlib


@pytest.mark.skipif(not have_matplotlib(), reason="matplotlib is not installed")
async def test_plots_are_written_when_matplotlib_is_there(tmp_path: Path) -> None:
    results = await run_experiment(ExperimentConfig(
        tmp_path, sweep="s2c * delay fixed({0,500}us)", runs=1, direct=True))
    assert [p.name for p in results.plots] == ["experiment.png", "breakdown.png"]
    for path in results.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
