"""How every command-line program ends on an expected failure: one clear message on stderr, a
non-zero exit, no Python traceback. Bad input, a bad config, a missing or damaged file are
expected; their messages name the file and the field. A real bug keeps its traceback, and
`--debug` (or STAGE2_DEBUG=1) keeps it for expected failures too.

    @cli_main
    def main(argv=None): ...
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "STAGE2_DEBUG"
EXIT_EXPECTED_FAILURE = 1


class UserError(Exception):
    """Base (or mixin) of failures caused by the user's input, config or files rather than a bug."""


# ValueError covers the project's validation errors (ConfigError, CheckpointError, ManifestError,
# Stage1LoadError, ...); the OSErrors are the user's paths.
EXPECTED_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                   PermissionError)


def cli_main(fn: Callable) -> Callable:
    """Wrap a program's `main(argv)`: strip `--debug`, and turn expected failures into one line + exit 1."""

    @functools.wraps(fn)
    def wrapper(argv: Optional[Sequence[str]] = None):
        args = list(sys.argv[1:] if argv is None else argv)
        debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        args = [a for a in args if a != DEBUG_FLAG]
        try:
            return fn(args)
        except EXPECTED_ERRORS as e:
            if debug:
                raise
            sys.stdout.flush()
            spec = fn.__globals__.get("__spec__")  # `python -m pkg.mod` runs as __main__
            prog = spec.name if spec is not None else fn.__module__
            print(f"{prog}: error: {e}\n(add {DEBUG_FLAG} for the traceback)", file=sys.stderr, flush=True)
            sys.exit(EXIT_EXPECTED_FAILURE)

    return wrapper
