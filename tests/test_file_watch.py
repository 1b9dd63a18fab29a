"""FileWatch (bgpool/supervisor/watch.py): which keys' glob patterns match a
file that changed, over one real inotify descriptor and real files.

Nothing sleeps: `reported()` writes a sentinel file (in a directory of its
own) last and waits on the descriptor with select() until the sentinel's key
comes back. inotify keeps one queue in order, so by then every event of what
the test did before was read, and the keys seen are all there will be.
`watched()` reads which directories the kernel watches from /proc/self/fdinfo,
so the tests check the watches themselves, not the module's bookkeeping.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import struct
import time
from collections.abc import Hashable, Iterator
from pathlib import Path

import pytest

from bgpool import platform
from bgpool.supervisor.watch import FileWatch

SENTINEL = "sentinel"
TIMEOUT = 10.0


@pytest.fixture
def watch() -> Iterator[FileWatch]:
    file_watch = FileWatch()
    try:
        yield file_watch
    finally:
        file_watch.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The directory relative patterns resolve against."""
    path = tmp_path / "root"
    path.mkdir()
    return path


def wait_for(watch: FileWatch, key: Hashable) -> set[Hashable]:
    """Every key `watch` reports until `key` is among them (a deadline, not a sleep)."""
    deadline = time.monotonic() + TIMEOUT
    seen: set[Hashable] = set()
    while key not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{key!r} was never reported (saw {seen})"
        readable, _, _ = select.select([watch], [], [], left)
        if readable:
            seen |= watch.changed()
    return seen


def reported(watch: FileWatch, tmp_path: Path) -> set[Hashable]:
    """The keys reported for everything done so far (the sentinel's left out)."""
    place = tmp_path / "sentinel"
    place.mkdir(exist_ok=True)
    watch.set(SENTINEL, place, ["flag"])
    (place / "flag").write_text("x")
    return wait_for(watch, SENTINEL) - {SENTINEL}


def watched(watch: FileWatch, top: Path) -> set[str]:
    """The directories the kernel watches for `watch`, relative to `top`
    (the sentinel's left out; `?INODE` for one not found under `top`)."""
    names = {os.stat(top).st_ino: "."}
    for path, _dirs, _files in os.walk(top):
        names[os.stat(path).st_ino] = os.path.relpath(path, top)
    inodes = set()
    with open(f"/proc/self/fdinfo/{watch.fileno()}") as info:
        for line in info:
            if line.startswith("inotify wd:"):
                inodes.add(int(line.split(" ino:")[1].split()[0], 16))
    return {names.get(inode, f"?{inode}") for inode in inodes} - {"sentinel"}


def write(path: Path, text: str = "x = 1\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# Patterns


def test_literal_file_counts_when_modified_and_when_closed_after_writing(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    app = root / "app.py"
    write(app)
    watch.set("k", root, ["app.py"])
    assert watched(watch, tmp_path) == {"root"}
    with open(app, "a") as still_open:
        still_open.write("y = 2\n")
        still_open.flush()  # IN_MODIFY alone: not closed yet
        assert reported(watch, tmp_path) == {"k"}
    assert reported(watch, tmp_path) == {"k"}  # IN_CLOSE_WRITE
    open(app, "a").close()  # IN_CLOSE_WRITE alone, nothing written
    assert reported(watch, tmp_path) == {"k"}


def test_a_file_no_pattern_matches_does_not_count(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    (root / "src" / "sub").mkdir(parents=True)
    watch.set("k", root, ["src/*.py", "app.py"])
    for name in ("src/a.pyx", "src/b.py.txt", "src/sub/c.py", "d.py", "app.py.bak", "xapp.py"):
        write(root / name)
    assert reported(watch, tmp_path) == set()
    write(root / "src" / "e.py")
    assert reported(watch, tmp_path) == {"k"}


def test_star_matches_within_one_directory_and_watches_only_it(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    (root / "src" / "sub").mkdir(parents=True)
    watch.set("k", root, ["src/*.py"])
    assert watched(watch, tmp_path) == {"root/src"}
    write(root / "src" / "sub" / "b.py")
    assert reported(watch, tmp_path) == set()
    write(root / "src" / "a.py")
    assert reported(watch, tmp_path) == {"k"}


def test_question_mark_and_brackets_match_one_character(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    (root / "a").mkdir()
    (root / "c").mkdir()
    watch.set("k", root, ["[ab]/x?.py"])
    assert watched(watch, tmp_path) == {"root", "root/a"}
    for name in ("c/x1.py", "a/x12.py", "a/x.py"):
        write(root / name)
    assert reported(watch, tmp_path) == set()
    write(root / "a" / "x7.py")
    assert reported(watch, tmp_path) == {"k"}
    write(root / "b" / "x8.py")  # a directory it can match, made later
    assert reported(watch, tmp_path) == {"k"}


def test_double_star_matches_at_every_depth(watch: FileWatch, root: Path, tmp_path: Path) -> None:
    (root / "src" / "x" / "y").mkdir(parents=True)
    (root / "other").mkdir()
    watch.set("k", root, ["src/**/*.py"])
    assert watched(watch, tmp_path) == {"root/src", "root/src/x", "root/src/x/y"}
    for name in ("src/a.py", "src/x/b.py", "src/x/y/c.py"):
        write(root / name)
        assert reported(watch, tmp_path) == {"k"}, name
    write(root / "other" / "d.py")
    write(root / "src" / "x" / "e.txt")
    assert reported(watch, tmp_path) == set()


def test_leading_double_star_covers_the_whole_root(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    (root / "deep" / "er").mkdir(parents=True)
    watch.set("k", root, ["**/*.py"])
    assert watched(watch, tmp_path) == {"root", "root/deep", "root/deep/er"}
    for name in ("a.py", "deep/er/b.py"):
        write(root / name)
        assert reported(watch, tmp_path) == {"k"}, name
    write(root / "deep" / "c.txt")
    assert reported(watch, tmp_path) == set()


def test_absolute_pattern_ignores_the_root(watch: FileWatch, root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    watch.set("k", root, [str(elsewhere / "*.cfg")])
    assert watched(watch, tmp_path) == {"elsewhere"}
    write(root / "a.cfg")
    assert reported(watch, tmp_path) == set()
    write(elsewhere / "a.cfg")
    assert reported(watch, tmp_path) == {"k"}


def test_pycache_never_counts_nor_is_watched(watch: FileWatch, root: Path, tmp_path: Path) -> None:
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    watch.set("k", root, ["**/*", "pkg/__pycache__/*.pyc"])
    assert watched(watch, tmp_path) == {"root", "root/pkg"}
    write(root / "pkg" / "__pycache__" / "m.cpython-311.pyc")
    write(root / "__pycache__" / "n.cpython-311.pyc")  # a new one, at the top
    assert reported(watch, tmp_path) == set()
    assert watched(watch, tmp_path) == {"root", "root/pkg"}
    write(root / "pkg" / "m.py")
    assert reported(watch, tmp_path) == {"k"}


# What happens to files


def test_editor_save_by_rename_over_counts(watch: FileWatch, root: Path, tmp_path: Path) -> None:
    app = root / "app.py"
    write(app)
    watch.set("k", root, ["app.py"])
    temporary = root / ".app.py.swp"
    write(temporary, "x = 2\n")
    assert reported(watch, tmp_path) == set()
    os.replace(temporary, app)
    assert reported(watch, tmp_path) == {"k"}


def test_deleted_file_counts(watch: FileWatch, root: Path, tmp_path: Path) -> None:
    write(root / "app.py")
    watch.set("k", root, ["*.py"])
    (root / "app.py").unlink()
    assert reported(watch, tmp_path) == {"k"}


def test_file_moved_in_or_out_counts(watch: FileWatch, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "a.py")
    watch.set("k", root, ["*.py"])
    os.rename(outside / "a.py", root / "a.py")
    assert reported(watch, tmp_path) == {"k"}
    os.rename(root / "a.py", outside / "b.py")
    assert reported(watch, tmp_path) == {"k"}


# Directories that come and go


def test_new_subdirectory_is_watched_at_once(watch: FileWatch, root: Path, tmp_path: Path) -> None:
    (root / "src").mkdir()
    watch.set("k", root, ["src/**/*.py"])
    (root / "src" / "new").mkdir()
    assert reported(watch, tmp_path) == set()  # a directory is not a matching file
    write(root / "src" / "new" / "a.py")
    assert reported(watch, tmp_path) == {"k"}


def test_files_made_in_a_new_directory_before_it_is_watched_count(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    (root / "src").mkdir()
    watch.set("k", root, ["src/**/*.py"])
    # written before changed() learns of the directories: only a scan finds it
    write(root / "src" / "n1" / "n2" / "b.py")
    assert reported(watch, tmp_path) == {"k"}
    assert watched(watch, tmp_path) == {"root/src", "root/src/n1", "root/src/n1/n2"}
    write(root / "src" / "n1" / "n2" / "c.py")
    assert reported(watch, tmp_path) == {"k"}


def test_directory_moved_in_counts_and_moved_out_is_no_longer_watched(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    (root / "src").mkdir()
    write(tmp_path / "outside" / "pkg" / "sub" / "mod.py")
    watch.set("k", root, ["src/**/*.py"])
    os.rename(tmp_path / "outside" / "pkg", root / "src" / "pkg")
    assert reported(watch, tmp_path) == {"k"}
    write(root / "src" / "pkg" / "sub" / "two.py")
    assert reported(watch, tmp_path) == {"k"}
    assert watched(watch, tmp_path) == {"root/src", "root/src/pkg", "root/src/pkg/sub"}
    os.rename(root / "src" / "pkg", tmp_path / "outside" / "gone")
    assert reported(watch, tmp_path) == {"k"}  # its files left with it
    assert watched(watch, tmp_path) == {"root/src"}
    write(tmp_path / "outside" / "gone" / "mod.py")  # not src/pkg/mod.py any more
    write(tmp_path / "outside" / "gone" / "sub" / "mod.py")
    assert reported(watch, tmp_path) == set()


def test_directory_renamed_over_an_empty_one_is_watched(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    (root / "src" / "old").mkdir(parents=True)
    write(tmp_path / "outside" / "new" / "a.py")
    watch.set("k", root, ["src/**/*.py"])
    os.rename(tmp_path / "outside" / "new", root / "src" / "old")
    assert reported(watch, tmp_path) == {"k"}
    assert watched(watch, tmp_path) == {"root/src", "root/src/old"}  # the new one
    write(root / "src" / "old" / "b.py")
    assert reported(watch, tmp_path) == {"k"}


def test_pattern_whose_directory_appears_later(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    watch.set("k", root, ["later/deep/**/*.py"])
    assert watched(watch, tmp_path) == {"root"}  # the nearest existing ancestor
    (root / "later").mkdir()
    write(root / "later.py")
    assert reported(watch, tmp_path) == set()
    assert watched(watch, tmp_path) == {"root/later"}
    write(root / "later" / "deep" / "x" / "a.py")  # all at once, before it is watched
    assert reported(watch, tmp_path) == {"k"}
    assert watched(watch, tmp_path) == {"root/later/deep", "root/later/deep/x"}
    write(root / "later" / "deep" / "b.py")
    assert reported(watch, tmp_path) == {"k"}


def test_pattern_directory_deleted_then_made_again(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    write(root / "src" / "a.py")
    watch.set("k", root, ["src/*.py"])
    shutil.rmtree(root / "src")
    assert reported(watch, tmp_path) == {"k"}
    assert watched(watch, tmp_path) == {"root"}
    (root / "src").mkdir()
    assert reported(watch, tmp_path) == set()
    write(root / "src" / "b.py")
    assert reported(watch, tmp_path) == {"k"}
    assert watched(watch, tmp_path) == {"root/src"}


# Keys


def test_keys_in_one_directory_share_its_watch(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    (root / "src").mkdir()
    watch.set("py", root, ["src/*.py"])
    watch.set("txt", root, ["src/*.txt"])
    watch.set("all", root, ["src/*"])
    assert watched(watch, tmp_path) == {"root/src"}
    assert len(kernel_watches(watch)) == 1
    write(root / "src" / "a.py")
    assert reported(watch, tmp_path) == {"py", "all"}
    write(root / "src" / "b.txt")
    assert reported(watch, tmp_path) == {"txt", "all"}
    watch.discard("all")
    watch.discard("txt")
    assert watched(watch, tmp_path) == {"root/src"}
    write(root / "src" / "c.py")
    assert reported(watch, tmp_path) == {"py"}


def test_one_directory_reached_by_two_paths(watch: FileWatch, root: Path, tmp_path: Path) -> None:
    (root / "real").mkdir()
    (root / "link").symlink_to("real")
    watch.set("via-link", root, ["link/*.py"])
    watch.set("direct", root, ["real/*.py"])
    write(root / "real" / "a.py")
    assert reported(watch, tmp_path) == {"via-link", "direct"}
    watch.discard("via-link")  # the kernel's one watch must stay for the other
    write(root / "real" / "b.py")
    assert reported(watch, tmp_path) == {"direct"}


def test_set_replaces_the_patterns_of_its_key(watch: FileWatch, root: Path, tmp_path: Path) -> None:
    (root / "a").mkdir()
    (root / "b").mkdir()
    watch.set("k", root, ["a/*.py"])
    watch.set("k", root, ["b/*.py"])
    assert watched(watch, tmp_path) == {"root/b"}
    write(root / "a" / "x.py")
    assert reported(watch, tmp_path) == set()
    write(root / "b" / "x.py")
    assert reported(watch, tmp_path) == {"k"}


def test_discard_and_no_patterns_stop_watching(
    watch: FileWatch, root: Path, tmp_path: Path
) -> None:
    (root / "src").mkdir()
    watch.set("gone", root, ["src/**/*.py"])
    watch.set("emptied", root, ["*.py"])
    watch.discard("gone")
    watch.set("emptied", root, [])
    watch.discard("never-set")
    assert kernel_watches(watch) == []
    write(root / "src" / "a.py")
    write(root / "b.py")
    assert reported(watch, tmp_path) == set()


# The descriptor and its problems


def test_changed_with_nothing_pending_returns_at_once(watch: FileWatch, root: Path) -> None:
    watch.set("k", root, ["*.py"])
    assert watch.changed() == set()
    assert watch.errors == []


def test_queue_overflow_counts_every_key(watch: FileWatch, root: Path) -> None:
    with open("/proc/sys/fs/inotify/max_queued_events") as limit:
        queue = int(limit.read())
    if queue > 100_000:
        pytest.skip(f"max_queued_events is {queue}: overflowing it would take too long")
    (root / "quiet").mkdir()
    (root / "busy").mkdir()
    watch.set("quiet", root, ["quiet/*.py"])
    watch.set("busy", root, ["busy/*"])
    # writes taking turns between two files: one IN_MODIFY each (the kernel
    # merges an event only into an identical one just before it)
    with open(root / "busy" / "a", "wb", 0) as a, open(root / "busy" / "b", "wb", 0) as b:
        for _ in range(queue // 2 + 100):
            a.write(b"x")
            b.write(b"x")
    assert "quiet" in wait_for(watch, "quiet")
    assert any("overflowed" in problem for problem in watch.errors)


def test_a_directory_that_cannot_be_watched_is_an_error(
    watch: FileWatch, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "src" / "x" / "y").mkdir(parents=True)

    def refuse(fd: int, path: str | os.PathLike[str], mask: int) -> int:
        code = errno.ENOSPC if Path(path).is_relative_to(root / "src") else errno.EACCES
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(platform, "inotify_add_watch", refuse)
    watch.set("many", root, ["src/**/*.py"])
    watch.set("more", root, ["src/x/*.py"])
    watch.set("one", root, ["*.py"])
    limit, denied = watch.errors
    assert limit.startswith(f"cannot watch {root / 'src'}: [Errno {errno.ENOSPC}]")
    assert "max_user_watches" in limit  # said once, not once per directory
    assert denied.startswith(f"cannot watch {root}: [Errno {errno.EACCES}]")


def test_close_closes_the_descriptor(root: Path) -> None:
    file_watch = FileWatch()
    file_watch.set("k", root, ["*.py"])
    fd = file_watch.fileno()
    os.fstat(fd)
    file_watch.close()
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
    assert file_watch.fileno() == -1
    file_watch.close()  # twice is fine
    assert file_watch.changed() == set()


def test_inotify_events_parses_a_buffer() -> None:
    def event(wd: int, mask: int, name: bytes, padded: int) -> bytes:
        return struct.pack("iIII", wd, mask, 7, padded) + name.ljust(padded, b"\0")

    data = event(1, platform.IN_CREATE, b"a.py", 16) + event(-1, platform.IN_Q_OVERFLOW, b"", 0)
    data += event(3, platform.IN_MOVED_TO | platform.IN_ISDIR, "é".encode(), 16)
    assert platform.inotify_events(data) == [
        (1, platform.IN_CREATE, "a.py"),
        (-1, platform.IN_Q_OVERFLOW, ""),
        (3, platform.IN_MOVED_TO | platform.IN_ISDIR, "é"),
    ]


def kernel_watches(watch: FileWatch) -> list[str]:
    """The kernel's watch lines for `watch` (sentinel's included: call before `reported`)."""
    with open(f"/proc/self/fdinfo/{watch.fileno()}") as info:
        return [line for line in info if line.startswith("inotify wd:")]
