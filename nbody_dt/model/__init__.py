"""The dt network: features (+history, normalization), the MLP, losses and the evaluation primitive.

Imports physics only; knows nothing of training loops, storage or orchestration.
"""
