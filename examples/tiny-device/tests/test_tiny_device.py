import pytest


@pytest.mark.vfioproxy_trace("traces/tiny-device-realize.trace")
async def test_the_widget_realizes_as_recorded(vfioproxy_replay, device_server):
    """QEMU 10.2's realize and reset, recorded once against the widget, must replay
    against it without a single divergence."""
    await vfioproxy_replay.check(device_server)
