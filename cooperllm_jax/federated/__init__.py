"""Federated rounds: client sampling and data, algorithms, edge aggregation."""
