"""``python -m proxy`` does what the ``proxy`` console script does."""

from proxy.cli.main import main

main()
