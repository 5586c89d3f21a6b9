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

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEBUG_VARIABLE = "DIFFCLS_DEBUG"
# The kinds of exception the suite's own checks raise for a person's mistake; raised elsewhere they are bugs.
USER_ERROR_TYPES = (ValueError, TypeError, OSError, RuntimeError, ArithmeticError)


def guarded(work, command: str = "python cli.py ...") -> int:
    """work()'s status; a person's mistake (user_facing_message) becomes one line and status 2, a bug keeps
    its traceback. The suite's tools run their work through it too."""
    try:
        return work()
    except KeyboardInterrupt:  # Ctrl-C: stopped on request, not a bug
        print("interrupted (Ctrl-C): stopped; files written so far are kept", file=sys.stderr)
        return 130
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
# ... and deeper: a nested key on the command line, or a group of a config file that does not take an option
NESTED_ARGUMENT = re.compile(r"NestedArg\(key='(?P<key>[\w.]+)'")
GROUP_OPTION = re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<option>\w+)'")
INNER_CLASS = re.compile(r"class_path='(?P<class_path>[\w.]+)'")


def nested_option_message(message: str, class_options, section_classes) -> str | None:
    """The message for a mistyped option below a class's first level (`model.init_args.classification.num_step`,
    `model.init_args.network.init_args.layers_per_blok`), on the command line or in a config file; None otherwise.
    section_classes(section): the class paths that section may hold, for the candidates when jsonargparse does not
    name the class."""
    section, nested, group = SECTION.search(message), NESTED_ARGUMENT.search(message), GROUP_OPTION.search(message)
    if not section or not (nested or group):
        return None
    bad = nested["key"] if nested else f"{group['group']}.{group['option']}"
    head, _, _ = bad.rpartition(".init_args.")
    inner = INNER_CLASS.search(message)
    if head and inner:  # an option of a class inside the class (the model's network)
        candidates = [f"{head}.init_args.{name}" for name in class_options(inner["class_path"])]
    else:
        candidates = [name for class_path in section_classes(section["section"]) for name in class_options(class_path)]
    close = difflib.get_close_matches(bad, list(dict.fromkeys(candidates)), n=3, cutoff=0.6)
    prefix = f"--{section['section']}.init_args."
    hint = f"; did you mean {' or '.join(prefix + name for name in close)}?" if close else ""
    return f"unknown option {prefix}{bad}{hint} (--help lists them all)"


def unknown_option_message(message: str, class_options, top_options: list[str], section_classes=None) -> str | None:
    """ "unknown option --data.init_args.bach_size; did you mean --data.init_args.batch_size?" for jsonargparse's
    message of a mistyped option, or None for any other message. class_options(class_path): the option names of
    that class (nested settings as `classification.num_steps`); top_options: the subcommand's own option names."""
    under = UNKNOWN_UNDER_CLASS.search(message)
    if under:
        section = SECTION.search(message)
        prefix = f"{section['section']}.init_args." if section else ""
        bad = under["option"] or under["argument"] or under["key"]
        where, candidates = f" (options of {under['class_path']})", class_options(under["class_path"])
    elif section_classes is not None and (nested := nested_option_message(message, class_options, section_classes)):
        return nested
    elif top := UNKNOWN_AT_TOP.search(message):
        prefix, bad, where, candidates = "", top["option"], "", top_options
    else:
        return None
    close = difflib.get_close_matches(bad, candidates, n=3, cutoff=0.6)
    close = close or [name for name in candidates if name.startswith(bad.split(".")[0] + ".")][:3]
    hint = f"; did you mean {' or '.join('--' + prefix + name for name in close)}?" if close else ""
    return f"unknown option --{prefix}{bad}{where}{hint} (--help lists them all)"


def given_config_files(given: list[str]) -> list[Path]:
    """The files of --config options on the command line, in their order."""
    files = [value.split("=", 1)[1] for value in given if value.startswith("--config=")]
    files += [given[i + 1] for i, value in enumerate(given[:-1]) if value == "--config"]
    return [Path(file) for file in files if Path(file).is_file()]


def config_file_holding(message: str, given: list[str]) -> str:
    """ " (in FILE)" when the mistyped option of `message` was written in a config file, not on the command line."""
    option = re.search(r"unknown option --(?P<option>[\w.]+)", message)
    if option is None or any(value.startswith(f"--{option['option']}") for value in given):
        return ""
    leaf = option["option"].rsplit(".", 1)[-1]
    files = [
        file for file in given_config_files(given) if re.search(rf"^\s*{re.escape(leaf)}\s*:", file.read_text(), re.M)
    ]
    return f" (in {files[-1]})" if files else ""


def yaml_error_place(error: Exception) -> str:
    """ "line 3, column 1" of a YAML parse error, or "" where the parser gives no position."""
    mark = getattr(error, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def broken_config_message(given: list[str]) -> str | None:
    """A config file that is not YAML, named with the line and column; None when every one parses."""
    for file in given_config_files(given):
        try:
            yaml.safe_load(file.read_text())
        except yaml.YAMLError as error:
            where = f" {yaml_error_place(error)}:" if yaml_error_place(error) else ""
            return f"config file {file}:{where} not valid YAML ({getattr(error, 'problem', None) or error})"
    return None
