"""`python fork_probe.py FORKS_AFTER [MODULE...]`: the do-nothing forked child
of `breakdown.py`'s memory split. Imports only MODULEs (nothing at the top, so
that "a plain interpreter" is one), freezes them as a code generation does,
forks a child that does nothing, forks FORKS_AFTER more children that exit at
once, prints the first child's pid, and waits to be killed."""

import sys


def main() -> None:
    import gc
    import importlib
    import os
    import signal

    for module in sys.argv[2:]:
        importlib.import_module(module)
    gc.freeze()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(w, b"x")
        signal.pause()
        os._exit(0)
    os.read(r, 1)
    for _ in range(int(sys.argv[1])):
        if os.fork() == 0:
            os._exit(0)
        os.wait()
    print(child, flush=True)
    signal.pause()


if __name__ == "__main__":
    main()
