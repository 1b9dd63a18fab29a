"""What runs in a worker process: the runtime between fork and target
(`runtime.py`) and the API the target calls (`handle.py`). Never imports the
supervisor or the application side.
"""
