"""The agents domain: entity types, entities, signals, wakes, dispatch, runners.

Modules here take and return plain values and never see HTTP requests; SQL lives in the
`*_store.py` modules next to the code that owns those tables.
"""
