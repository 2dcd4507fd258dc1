"""proxytap: an explicit forwarding proxy that mirrors every inner flow to analyzers."""

__version__ = "0.1.0"
