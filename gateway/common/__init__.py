"""The shared floor: what the gateway and the aggregator both use, importing neither service.

Wire format, reading and series types, the history query, HTTP helpers, auth, settings loading,
the viewer's static files, time formatting, backoff and names. Nothing here imports
`gateway.<service part>` or `cloud_sync`; `tests/test_layering.py` enforces it.
"""
