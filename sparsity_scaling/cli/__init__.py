"""The command-line layer: every command and tool parses its flags here, builds the
library's typed settings from them, and words the library's errors in terms of its flags.
The only library code that imports argparse or `launcher`."""


def main(argv: list[str] | None = None) -> int:
    """`sparsity-scaling` (imported on use, so the tools load only their own command line)."""
    from .program import main as run

    return run(argv)
