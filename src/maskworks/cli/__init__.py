"""The ``maskworks`` command line."""
