"""What every command line shares: one-line errors (exit status 2, no traceback), setting
names worded as flags, and argument types."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager, nullcontext

from ..errors import SettingError, UserError

PROG = "sparsity-scaling"

# Library setting names whose flag is not simply --name-with-dashes.
FLAG_OF = {"text_file": "--data", "run_dir": "--out"}


def flag(setting: str) -> str:
    return FLAG_OF.get(setting, "--" + setting.replace("_", "-"))


def error_text(error: UserError) -> str:
    """The error in the command line's words: settings named by their flags."""
    return error.render(flag) if isinstance(error, SettingError) else str(error)


class ErrorLine:
    """How ranks started by a command report a user error (picklable, for spawned ranks)."""

    def __init__(self, prog: str = PROG):
        self.prog = prog

    def __call__(self, error: UserError) -> str:
        return f"{self.prog}: error: {error_text(error)}"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run(parser: Parser, argv=None, interrupted: str = "interrupted") -> int:
    """Parse, run `args.run(args)`, and turn a user's mistake into one line and status 2."""
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        args.run(args)
    except UserError as error:
        print(ErrorLine(prog)(error), file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as on SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:
        where = f"{error.filename}: {error.strerror}" if error.filename else str(error)
        print(f"{prog}: error: {where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def mlflow_arguments(parser) -> None:
    parser.add_argument("--mlflow-run", metavar="RUN_DIR_OR_ID",
                        help="also log the results to this MLflow run (a grid's run directory or a run id)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the run directory's, or $MLFLOW_TRACKING_URI)")


@contextmanager
def mlflow_publisher(args, folder: str = "analysis"):
    """With --mlflow-run: a logger of files (under `folder`) and metrics to that run,
    checked before any work. A grid's run
    directory without a tracking URI uses the grid's local MLflow server, started for the
    command (on the port its runs recorded) and stopped after it."""
    if not args.mlflow_run:
        yield None
        return
    from launcher.tracking import ArtifactLogger, run_target, tracking
    from launcher.workdir import Workdir

    from ..rundir import RunDir

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    run = RunDir(args.mlflow_run)
    workdir = Workdir.of_run(run)
    local = uri is None and run.path.is_dir() and workdir.has_mlflow_store()
    with tracking(workdir) if local else nullcontext(uri) as uri:
        uri, run_id = run_target(args.mlflow_run, uri)
        yield ArtifactLogger(uri, run_id, folder)
