"""mimsweep sweeps: the entry script, the grid expansion and the sweep specs (conf/sweep/)."""
