"""The `lorakit` command line: `main.py` parses, the command modules hold one thin function per subcommand."""
from lorakit.cli.main import main

__all__ = ["main"]
