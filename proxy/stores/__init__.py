"""Where shared state lives: this worker's memory or one Redis (``backends.py`` chooses)."""
