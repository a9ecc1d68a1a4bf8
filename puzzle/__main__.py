"""`python -m puzzle` is the `puzzle` command."""

from puzzle.cli.app import main

if __name__ == "__main__":
    main()
