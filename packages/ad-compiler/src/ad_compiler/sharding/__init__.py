"""Sharding: plans as data (detect) and their application to a GraphModule (executor)."""
