"""bgpool's compiled parts: for shared state, the vars codec (bgpool/shm/_codec.c)
and the vars segment's seqlock (bgpool/shm/_segment.c); and the system calls the os
module has no function for (bgpool/_oscalls.c). Everything else is declared in
pyproject.toml. Installing therefore needs a C compiler and Python's headers
(`pip install -e .` builds them in place)."""

from setuptools import Extension, setup

FLAGS = ["-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        *(
            Extension(f"bgpool.shm.{name}", [f"bgpool/shm/{name}.c"], extra_compile_args=FLAGS)
            for name in ("_codec", "_segment")
        ),
        Extension("bgpool._oscalls", ["bgpool/_oscalls.c"], extra_compile_args=FLAGS),
    ]
)
