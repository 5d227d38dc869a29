"""Declares the optional C accelerator for backends.walk; metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("backends._fastwalk", ["backends/_fastwalk.c"], extra_compile_args=["-O2"])])
