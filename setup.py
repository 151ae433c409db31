"""The compiled part of the package (everything else is declared in pyproject.toml)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # the channels' spin-then-block receive (symbiosis/transport/waiting.py); optional: without a
        # C compiler the install goes on and channels block in a plain receive
        Extension("symbiosis.transport._wait", ["src/symbiosis/transport/_wait.c"], optional=True),
    ],
)
