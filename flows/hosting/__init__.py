"""Hosting Prefect for a run: the temporary API server and its database, Prefect's settings, the
watchdog that stops what a killed run leaves behind, and the side-by-side runs of `mmdiag demo`."""
