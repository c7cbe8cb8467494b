"""What every command line shares: help that shows each option's default, one-line errors for user mistakes, help
and usage errors printed by rank 0 only under torchrun, and run directories that a failed start does not leave behind.

    p = cli.parser(__doc__)                  # argparse.ArgumentParser with HelpFormatter and --debug
    ...
    if __name__ == "__main__":
        cli.run(main)                        # main(argv) itself still raises: tests call it directly

User errors, reported as `PROG: error: MESSAGE` on stderr with exit status 2 (as argparse reports a bad flag) and no
traceback: USER_ERRORS (ValueError: a bad value, option, config or file content; FileNotFoundError and the other
"this path is wrong" OSErrors, igpt.sources.DatasetUnavailableError among them; igpt.checkpoint.CheckpointError) and
SystemExit with a message. Anything else is a bug and keeps its traceback; `--debug` keeps it for user errors too.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import sys
from pathlib import Path

from igpt.checkpoint import CheckpointError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
               CheckpointError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The description as written (module docstrings), and `(default: X)` after every option that takes a value and
    has a default (not None, not already stated as "(default: ...)"); flags such as --resume are off unless given."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or action.nargs == 0 or "(default:" in text
                or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()

    def _format_action(self, action):
        if action.help is None and self._get_help_string(action):  # argparse prints nothing for help=None
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


def rank() -> int:
    """This process's rank under torchrun (RANK, else LOCAL_RANK), 0 when run alone."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


class _Debug(argparse.Action):
    """--debug: remembered at parse time, so that `run` keeps the traceback of a user error."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=False, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        global _debug
        _debug = True
        setattr(namespace, self.dest, True)


class _RankZeroHelp(argparse._HelpAction):
    """-h/--help printed by rank 0 only: `torchrun --nproc_per_node=K igpt/train.py --help` prints it once."""

    def __call__(self, parser, namespace, values, option_string=None):
        if rank() == 0:
            parser.print_help()
        parser.exit()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, --debug, and help and usage errors printed by rank 0 only (others exit silently
    with the same status)."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, add_help=False, **kw)
        self.add_argument("-h", "--help", action=_RankZeroHelp, help="show this help message and exit")
        self.add_argument("--debug", action=_Debug, help="show the full traceback of an error")

    def error(self, message):
        if rank() != 0:
            self.exit(2)
        super().error(message)


def parser(description: str | None = None, **kw) -> ArgumentParser:
    return ArgumentParser(description=description, **kw)


_debug = False


def run(main, argv=None):
    """Call main(argv) as a command: user errors become one `PROG: error: MESSAGE` line and exit status 2."""
    global _debug
    _debug = False
    prog = os.path.basename(sys.argv[0])
    try:
        result = main(argv)
    except SystemExit as e:
        if isinstance(e.code, str) and not _debug:  # raise SystemExit("why"): a user error too
            _fail(prog, e.code)
        raise
    except KeyboardInterrupt:
        if _debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if _debug:
            raise
        _fail(prog, str(e) or type(e).__name__)
    sys.exit(result if isinstance(result, int) else 0)


def _fail(prog: str, message: str):
    message = " ".join(message.split())  # one line, whatever the message's own line breaks
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@contextlib.contextmanager
def new_dir(path):
    """Create the directory `path` (and missing parents) for the block; if the block raises, remove what this call
    created, so a failed start leaves no empty run directory. A folder that existed before is never removed."""
    path = Path(path)
    top, p = None, path.absolute()
    while not p.exists():
        top, p = p, p.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise
