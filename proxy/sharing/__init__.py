"""Answers shared between requests.

``policy.py`` decides which requests may share and under what key; ``dedup.py`` joins
identical requests in flight; ``cache.py`` keeps finished answers; ``peers.py`` sends a
request to the worker that owns its key.
"""
