"""What protects an upstream and a caller, on real evidence of trouble only.

``failover.py`` (deployments and fallbacks), ``retry.py`` (when to try again),
``breaker.py`` (steer away from a failing upstream), ``concurrency.py`` (the adaptive
limit and its queue) and ``ratelimit.py`` (requests and tokens per gateway key).
"""
