"""Scoring trained models: the protocols and their runs (`evaluator`) over confusion-matrix metrics
(`metrics`)."""
