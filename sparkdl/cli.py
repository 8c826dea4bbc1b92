"""How every job ends: one line on stderr and an exit code a scheduler can act on.

``run_job(name, main)`` runs a job's ``main(argv)``; any error that escapes it is printed as
``sparkdl <name> failed: <reason>`` (the cause of a Spark failure included, see
``sparkdl.errors.failure_reason``) with exit code 1. Usage errors keep argparse's exit code 2.
``--debug`` (or ``SPARKDL_DEBUG=1``) adds the traceback after that line.

    if __name__ == "__main__":
        sys.exit(run_job("train", main))
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence

from sparkdl.errors import failure_reason

__all__ = ["run_job"]


def run_job(name: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
            owns_debug_flag: bool = False) -> int:
    """Run ``main(argv)`` and return its exit code; map any exception to one line and 1.

    ``owns_debug_flag``: ``main``'s own parser takes ``--debug`` (it is passed through); otherwise
    ``run_job`` takes it out of ``argv`` before calling ``main``."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("SPARKDL_DEBUG", "") not in ("", "0")
    if not owns_debug_flag:
        args = [a for a in args if a != "--debug"]
    try:
        code = main(args)
    except SystemExit:  # argparse: 2 for a usage error, 0 for --help; the job's own exit codes
        raise
    except KeyboardInterrupt:
        print(f"sparkdl {name} interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        print(f"sparkdl {name} failed: {failure_reason(e)}", file=sys.stderr, flush=True)
        if debug:
            traceback.print_exc()
        return 1
    return int(code or 0)
