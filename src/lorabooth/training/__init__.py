"""The training run: data, prior, objective, the loop, checkpoints, EMA, the run folder."""
