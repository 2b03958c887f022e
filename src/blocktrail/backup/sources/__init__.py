"""Adapters that put a disk behind the `Source` protocol."""
