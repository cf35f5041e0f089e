from typing import Any

class Appender:
    fd: int
    seq: int
    size: int
    reserved_end: int
    reserve: int
    fast: int
    inline_max: int
    def __init__(self) -> None: ...
    def acquire(self) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> Appender: ...
    def __exit__(self, *exc: object) -> None: ...

def relay(
    client_fd: int,
    server_fd: int,
    wake_fd: int,
    max_message_size: int,
    buffer_limit: int,
    appender: Appender | None,
    c2s_parts: tuple[bytes, bytes, bytes] | None,
    s2c_parts: tuple[bytes, bytes, bytes] | None,
    c2s_event: tuple[bytes, bytes, bytes, bytes] | None,
    s2c_event: tuple[bytes, bytes, bytes, bytes] | None,
    c2s_index: int,
    s2c_index: int,
    handback: int,
    max_messages: int,
    idle_ms: int,
    c2s_commands: int = ...,
    s2c_commands: int = ...,
    /,
) -> tuple[Any, ...]: ...
