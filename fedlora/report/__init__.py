"""What a run reports: the results folder (``results``), exact byte accounting of the messages
(``comm``), plots (``plots``), the comparison of finished runs (``compare``) and their numbers kept
as two CSV files (``archive``).

Layer 4: may import the layers below it (core, aggregation, privacy, tasks, model), never the
config, the clients, the strategies or the run loop.
"""
