"""Pure training compute: collection (Part 1), replay (Part 2), epochs, evaluators.

Tensors in, tensors and plain metrics out. Never imports Prefect or storage.
"""
