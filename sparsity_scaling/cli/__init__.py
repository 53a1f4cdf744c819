"""The command-line layer: every command and tool parses its flags here, builds the
library's typed settings from them, and words the library's errors in terms of its flags.
The only library code that imports argparse or `launcher`."""

from .main import main

__all__ = ["main"]
