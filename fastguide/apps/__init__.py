"""The command-line apps: ``fastguide`` (cli), the digits model, the guidance sweep, the
benchmark suite runner and the self-check."""
