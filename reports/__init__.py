"""Reports: the papers' tables and figures rebuilt from the tracked runs, beside the papers' numbers.

`build.py` is the entry (one sweep's report, `--site` for every sweep of a store); `runs.py` reads the runs of a
sweep (in bulk from a database store), `table.py` aggregates and renders them (pandas), `agreement.py` answers
whether ours agrees with the paper's, `figures.py` draws small multiples, `site.py` the static site. It may
import everything below it (core, sweeps, cluster: the status of a sweep); nothing imports it but bench/.
"""
