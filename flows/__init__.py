"""Orchestration and the `mmdiag` command line. (Prefect flows land here.)"""
