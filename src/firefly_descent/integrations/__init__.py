"""Growth inside training frameworks that own the optimizer, the DDP wrapper and the checkpoints.

Each integration is its own module with an optional dependency, imported only when asked for:
``firefly_descent.integrations.lightning`` (``pip install "firefly-descent[lightning]"``) and
``firefly_descent.integrations.hf`` (``pip install "firefly-descent[hf]"``). Nothing is imported here, so
``import firefly_descent`` never needs either framework.
"""
