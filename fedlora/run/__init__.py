"""Running a federation: the ServerApp and its round loop (``server``), the command line and
Hydra glue (``cli``), checkpoints (``checkpoint``) and the client host of deployments
(``clienthost``).

Layer 8: may import every layer below it; only the entry points (``fedlora.simulate``,
``fedlora.deploy``, ``fedlora.sweep``, ``fedlora.compare``) import it.
"""
