"""bgpool's benchmark. scripts/bench.py is its entry point and its manual (what
each case measures, exactly); this package is the code, one job a module:

    cli         the command line: options, header, table, summary, JSON, exit status
    config      the run's sizes: the presets (full, --quick) and the overrides
    run         the phases: which cases run, in which order, what they share
    targets     the case ids, their units, their targets
    harness     rows and their statistics, the timing loops, ratios and targets
    report      the progress lines, the table, the summary, the JSON document
    baselines   bare forks with a pipe handshake; dict.get; multiprocessing
    floors      the bare floors: fork + handshake, reap, start N, drain N, from a
                supervisor-sized helper and a clean one (floor_helper.py, the
                helpers' program, run with python -c)
    cases       bgpool's worker cases: ensure(), crash, drain, idle cost, scale
    vars_cases  bgpool's shared-state cases: get_vars(), set_vars(), decoding
    reload_cases  bgpool's reload cases: an edit to new code, cold ensure() on
                a new generation, ready instances during a rolling restart
    asgi_cases  requests per second of a uvicorn app with and without bgpool calls
    daemons     private supervisord, circusd and pm2 daemons (pm2 through
                pm2_driver.js, its node client), or why they are skipped
    peers       what the cases measure of the peers, each through its daemon
    channels    hearing back from other processes: FIFOs, files, forked children
    costs       what an idle supervising process costs: CPU, RSS, its workers' USS
    machine     the machine, who else used it during the run, leftover processes

A phase records a case's floors, then its baseline, then bgpool, then the peers,
into one harness.Bench; at the end the Bench sets the ratios and checks the targets, and
report prints them. This process owns the pools and the peer daemons; forked
children (the bare baselines, the readers and clients of the "other process"
cases) report back over pipes, FIFOs and files. The workers are
scripts/bench_workers.py, kept a top-level module outside this package: the
supervisor imports it by name (`bench_workers:idle`) and the peers run it as a
script, where every import before its first line is charged to the peer.
"""
