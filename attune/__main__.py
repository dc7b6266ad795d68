"""``python -m attune`` is the ``tune`` command line."""

from attune.cli.main import main

if __name__ == "__main__":
    main()
