"""Talking to upstreams, the last step of the data path.

``client.py`` sends a prepared request and maps aiohttp's failures to the gateway's
errors; ``pool.py`` leases keep-alive connections from the shared connector;
``protocol.py`` is the HTTP/1.1 exchange on one connection; ``deadlines.py`` holds an
exchange's deadlines; ``discovery.py`` lists models and probes health in the background.
"""
