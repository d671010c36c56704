"""Prefect tasks: thin wrappers that bind run storage to the training library.

They take and return small handles (run URL, epoch, row counts, metric dicts), never tensors
or networks, and hold no math.
"""
