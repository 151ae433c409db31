"""The ``symbiosis`` command line."""
