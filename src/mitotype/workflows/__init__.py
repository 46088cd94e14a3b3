"""Orchestration of whole jobs (train, cv, benchmark, evaluate, predict) above the stages.

The stages (data, transforms, models, training, evaluation, inference) never import this package;
the CLI only parses options and calls it.
"""
