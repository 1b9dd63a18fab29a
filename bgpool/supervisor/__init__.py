"""The supervisor process: one thread, one event loop, every state transition.
Started by `Pool.start()` as a fresh interpreter (`main.py`); never imported by
worker-side or application-side code.
"""
