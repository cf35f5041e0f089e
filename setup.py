"""The one native part: vfioproxy/proxy/_fastpath.c (the proxy's plain-message lane).

Everything else is in pyproject.toml. The extension is optional: where it
cannot be built, vfioproxy runs the same forwarding in Python
(vfioproxy/proxy/fastpath.py says which one runs).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vfioproxy.proxy._fastpath",
            ["vfioproxy/proxy/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                                "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
