"""bgpool's one compiled part, the vars codec (bgpool/_codec.c); everything else
is declared in pyproject.toml. Installing therefore needs a C compiler and
Python's headers (`pip install -e .` builds it in place)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "bgpool._codec",
            sources=["bgpool/_codec.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        )
    ]
)
