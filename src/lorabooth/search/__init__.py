"""Searches over runs: sweep (a grid) and tune (Optuna), their spaces, workers and reports."""
