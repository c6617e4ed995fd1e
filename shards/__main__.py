"""`python -m shards ls|stats|verify|gc URL` (the commands live in shards.cli)."""

from .cli import main

if __name__ == "__main__":
    main()
