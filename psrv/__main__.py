"""`python -m psrv`: the same command line as `psrv` and `python launch.py`."""
import sys

from .launch import cli

if __name__ == "__main__":
    sys.exit(cli())
