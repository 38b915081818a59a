"""Kernel adapters, one module per kernel family, behind one capability table (capabilities.py)."""
