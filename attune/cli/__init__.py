"""The ``tune`` command line: ls, cp, cat, validate, run, download."""
