"""I/O below the protocol: owned fds and their inspection (:mod:`~vfioproxy.io.fds`),
the trio stream that sends a message with its fds in one ``sendmsg``
(:mod:`~vfioproxy.io.transport`) and its blocking twin
(:mod:`~vfioproxy.io.blocking_transport`), and UNIX-socket helpers
(:mod:`~vfioproxy.io.unix`)."""
