"""A person's mistake as one line, a bug as a traceback: what cli.py and the tools print when something fails.

A mistake (a wrong path, option, file or checkpoint) is an exception the suite's own checks raise,
with a message that names the culprit; anything else is a bug and keeps its traceback. Setting
DEBUG_VARIABLE=1 shows the traceback of a mistake too.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEBUG_VARIABLE = "DIFFCLS_DEBUG"
# The kinds of exception the suite's own checks raise for a person's mistake; raised elsewhere they are bugs.
USER_ERROR_TYPES = (ValueError, TypeError, OSError, RuntimeError, ArithmeticError)


def guarded(work, command: str = "python cli.py ...") -> int:
    """work()'s status; a person's mistake (user_facing_message) becomes one line and status 2, a bug keeps
    its traceback. The suite's tools run their work through it too."""
    try:
        return work()
    except Exception as error:
        message = user_facing_message(error)
        if message is None or os.environ.get(DEBUG_VARIABLE):
            raise
        print(f"error: {message}", file=sys.stderr)
        print(f"       (the full traceback: {DEBUG_VARIABLE}=1 {command})", file=sys.stderr)
        return 2


def user_facing_message(error: BaseException) -> str | None:
    """The message of the exception a person should read, or None for a bug (which keeps its traceback).

    That is the innermost exception of the chain raised by the suite's own code (its checks of
    options, data and checkpoints say what is wrong and how to fix it; jsonargparse wraps them in
    errors of its own), or a parse error of an option or config file."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    for candidate in reversed(chain):
        if isinstance(candidate, USER_ERROR_TYPES) and raised_by_the_suite(candidate):
            return str(candidate).strip().replace("\n", " ")
    for candidate in chain:
        if isinstance(candidate, argparse.ArgumentError):
            return str(candidate).strip().splitlines()[0]
        if isinstance(candidate, OSError) and candidate.filename:  # a path given by a person, wherever opened
            return f"{candidate.filename}: {candidate.strerror or candidate}"
    return None


def tool_main(main, command: str) -> None:
    """A tool's `if __name__ == "__main__":` exit: main()'s status (0 when it returns no int), a person's
    mistake as one line and status 2."""
    status = guarded(main, command)
    sys.exit(status if isinstance(status, int) else 0)


def raised_by_the_suite(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    raised_in = Path(frames[-1].filename) if frames else None  # compiled extensions give relative names
    return raised_in is not None and raised_in.is_absolute() and raised_in.resolve().is_relative_to(REPO_ROOT)


# jsonargparse's ways of saying an option does not exist: under a class (model, data, a callback), or at the top
UNKNOWN_UNDER_CLASS = re.compile(
    r"class_path '(?P<class_path>[\w.]+)':\s+(?:Option '(?P<option>[\w.]+)' is not accepted|"
    r"unrecognized arguments: --(?P<argument>[\w.]+)|Key \"(?P<key>[\w.]+)\" is not expected)"
)
UNKNOWN_AT_TOP = re.compile(r"nrecognized arguments: --(?P<option>[\w.]+)")
SECTION = re.compile(r'Parser key "(?P<section>[\w.]+)"')


def unknown_option_message(message: str, class_options, top_options: list[str]) -> str | None:
    """ "unknown option --data.init_args.bach_size; did you mean --data.init_args.batch_size?" for jsonargparse's
    message of a mistyped option, or None for any other message. class_options(class_path): the option names of
    that class (nested settings as `classification.num_steps`); top_options: the subcommand's own option names."""
    under = UNKNOWN_UNDER_CLASS.search(message)
    if under:
        section = SECTION.search(message)
        prefix = f"{section['section']}.init_args." if section else ""
        bad = under["option"] or under["argument"] or under["key"]
        where, candidates = f" (options of {under['class_path']})", class_options(under["class_path"])
    elif top := UNKNOWN_AT_TOP.search(message):
        prefix, bad, where, candidates = "", top["option"], "", top_options
    else:
        return None
    close = difflib.get_close_matches(bad, candidates, n=3, cutoff=0.6)
    close = close or [name for name in candidates if name.startswith(bad.split(".")[0] + ".")][:3]
    hint = f"; did you mean {' or '.join('--' + prefix + name for name in close)}?" if close else ""
    return f"unknown option --{prefix}{bad}{where}{hint} (--help lists them all)"
