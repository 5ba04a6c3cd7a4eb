"""Adapters from common ML libraries to flnode's client API (Flower's NumPyClient shape).

`flnode.adapters.torch` (needs `pip install flnode[torch]`) and `flnode.adapters.sklearn` (needs scikit-learn)
are imported on demand, so this package costs nothing to a node that uses neither.
"""
