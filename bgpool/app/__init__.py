"""What runs in the application's processes: `Pool` (the owner of a pool),
`PoolClient` (any process), and the metrics and health server. Nothing here is
imported by the supervisor or by worker-side code.
"""
