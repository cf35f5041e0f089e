import platform

import pytest

from vfioproxy.proxy.tuning import tune_allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_allocator_keeps_message_sized_buffers_in_the_heap_on_glibc():
    assert tune_allocator() is True
