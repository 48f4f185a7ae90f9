"""Sweeps: strategies as data, their search spaces, Optuna studies worked off by workers."""
