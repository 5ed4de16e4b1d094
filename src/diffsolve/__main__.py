"""``python -m diffsolve``: the ``diffsolve`` command line (``diffsolve --help``)."""

from .cli import main

if __name__ == "__main__":
    main()
