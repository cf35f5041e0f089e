"""What every command of the ``vfioproxy`` command line shares with the
others, below the layers that define commands (``cli``, ``replay``,
``experiment``): exit codes (:mod:`~vfioproxy.usage.exits`), argument types
that check a value where it is parsed (:mod:`~vfioproxy.usage.types`), and
what ``-o`` means (:mod:`~vfioproxy.usage.output`)."""
