"""What more than one test module needs (imported as `helpers.<module>`).

damage: breaking chunk records on purpose, and an oracle that tells a damaged
    record apart without the code under test.
trees: reading a plain directory tree back (`files_of`).
procs: whether a process still runs.
"""
