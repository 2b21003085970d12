"""The ClientApp and the local computation of a federated client.

Layer 6: may import config and the layers below it (core, aggregation, privacy, model,
tasks, report); never the strategies or the run loop.
"""
