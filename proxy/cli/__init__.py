"""The command line (``main.py``): ``proxy serve | init | models | check | keys hash``."""
