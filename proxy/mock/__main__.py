"""``python -m proxy.mock --port 9000 ...``: the mock upstream on its own (``server.py``)."""

from proxy.mock.server import main

main()
