#!/usr/bin/env python3
"""`python cli.py ...` from a checkout runs the same code as the `nsa-gen` command."""
import sys

from nsa_gen.cli import main

if __name__ == "__main__":
    sys.exit(main())
