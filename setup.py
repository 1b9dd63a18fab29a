"""bgpool's compiled parts: for shared state, the vars codec (bgpool/shm/_codec.c)
and the vars segment's seqlock (bgpool/shm/_segment.c); the system calls the os
module has no function for (bgpool/_oscalls.c); and immortal objects for code
generations (bgpool/_heap.c). Everything else is declared in
pyproject.toml. Installing therefore needs a C compiler and Python's headers
(`pip install -e .` builds them in place)."""

from setuptools import Extension, setup

FLAGS = ["-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

MODULES = ("shm._codec", "shm._segment", "_oscalls", "_heap")

setup(
    ext_modules=[
        Extension(f"bgpool.{name}", [f"bgpool/{name.replace('.', '/')}.c"], extra_compile_args=FLAGS)
        for name in MODULES
    ]
)
