"""Shared memory: the readiness table, the vars segments and their snapshot
format, with the two C parts (`_codec.c`, `_segment.c`). Written by one side,
read by every process; imports nothing from the process-role packages.
"""
