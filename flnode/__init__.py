"""flnode: federated learning with no central server."""

__version__ = "0.1.0"
