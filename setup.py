"""Declares the optional C accelerators (backends.walk, the usage engine's reader); metadata: pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("backends._fastwalk", ["backends/_fastwalk.c"], extra_compile_args=["-O2"]),
        Extension("agent.engine.usage._dirread", ["agent/engine/usage/_dirread.c"], extra_compile_args=["-O2"]),
    ]
)
