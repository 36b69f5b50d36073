"""`python -m finqlora` is the same as the `finqlora` command."""

from finqlora.cli import main

main()
