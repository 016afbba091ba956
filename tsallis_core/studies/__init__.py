"""Studies and reports over many runs: the q-sweep, the escape study, plots, the simulator."""
