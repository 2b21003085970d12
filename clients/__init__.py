"""The ClientApp and the local computation of a federated client."""
