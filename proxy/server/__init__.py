"""Serving: a worker on its sockets, the guard at the client edge, N workers supervised.

``serve.py`` runs one worker until a signal; ``guard.py`` bounds what one client
connection may cost before a request reaches ``core.py``; ``supervisor.py`` runs
``--workers N`` processes and restarts the ones that die.
"""
