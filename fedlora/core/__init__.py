"""The foundation every layer stands on: errors, declarative settings fields and the plugin
registry (``register_strategy``, ``register_task``).

Layer 0: imports nothing from fedlora. Every other package may import it.
"""
