"""The instruction-data collection: registry, converters to the unified format, and curation tools.

`data/collection.py` is the command line over this package; `data/registry.json` is the registry.
"""
