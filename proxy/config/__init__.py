"""The one configuration: ``loader.py`` builds it, the other modules are its sections."""
