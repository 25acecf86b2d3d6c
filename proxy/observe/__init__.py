"""What operators see: metrics, the access log, usage accounting and the status page.

Fed by ``observers.py`` in batches after each request ends (``record.py``), so the
request's own path only appends its record.
"""
