#!/usr/bin/env python3
"""psrv's command line: `python launch.py [CONFIG.toml] [--workers N] [--set section.key=value ...]`."""
import sys

from psrv.launch import cli

if __name__ == "__main__":
    sys.exit(cli())
