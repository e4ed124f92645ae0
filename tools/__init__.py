"""Development tools, not installed: the static kernel report and the unfused ADM forward
that tests and benchmarks use as an oracle."""
