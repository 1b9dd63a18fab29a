"""The coordinator process: a pool's singleton leases on Redis (main.py)."""
