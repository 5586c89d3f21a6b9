"""Every command line of the manual (README.md and docs/*.md) goes through the real parsers, so an option
that does not exist fails the suite.

A command line is a line of a fenced code block, or an inline code span, that starts with `python cli.py `,
`python -m tools.<name> ` or `make <target>` (after an optional `$ ` and `NAME=value` assignments; a line
ending in a backslash goes on on the next). Each distinct line is checked once:

- `python cli.py SUBCOMMAND ...`: `cli.main([... , "--print_config"], exit_on_error=False)` parses every
  option with the CLI's own parser, prints the config and exits 0; an unknown option raises
  argparse.ArgumentError (or exits non-zero). Nothing is instantiated.
- `python -m tools.X ...`: `tools.X.main(argv)` with argparse's parsing patched to parse for real and then
  stop, so nothing runs after parsing; an unknown option makes argparse exit with status 2. Options after
  `--`, which tools.classify and tools.side_by_side pass to cli.py, go through the CLI's parser too.
- `make TARGET`: the target exists in the Makefile.

Options named in the prose (an inline code span such as `model.init_args.classification.rule` or
`--trainer.max_steps`) are looked up among the options of the suite's model, data, network and Trainer
classes, as the CLI lists them for its suggestions (cli.class_option_names).

What a reader substitutes is left as it is where it parses (paths such as `path/to/images/`, `CKPT`), with
two exceptions: a trailing `...` is dropped, and a `--config` file that exists only after a run (under
`runs/`) is read as configs/demo.yaml.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import io
import re
import shlex
import sys
from unittest import mock

import pytest
from jsonargparse import set_parsing_settings

from tests.helpers import ROOT

MANUAL = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:python cli\.py|python -m tools\.\w+|make)(?:\s|$)")
ASSIGNMENT = re.compile(r"^(?:\$\s+)?(?:\w+=\S*\s+)*")  # a prompt and env assignments before the command
FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
SHELL_OPERATORS = (">", ">>", "2>", "2>&1", "|", "||", "&&", ";", "&")
RUN_ONLY_CONFIG = "configs/demo.yaml"  # what a config written by a run (runs/...) is read as
TOOLS_PASSING_TO_CLI = {"classify": "predict", "side_by_side": "fit"}  # the subcommand the options after -- go to
# lines the manual shows failing on purpose, with the error it quotes: they must fail with exactly that
SHOWN_FAILING = {
    "python cli.py fit --config configs/demo.yaml --data.init_args.bach_size 8": (
        "unknown option --data.init_args.bach_size (options of datamodules.SyntheticDataModule); did you mean "
        "--data.init_args.batch_size or --data.init_args.image_size? (--help lists them all)"
    ),
}
# options the manual names as a mistake on purpose (they must not exist)
SHOWN_WRONG_OPTIONS = {"data.init_args.bach_size", "trainer.max_step"}
OPTION = re.compile(r"^(?:--)?((?:model|data|trainer)\.[\w.*]+)")
NOT_OPTIONS = {"model.safetensors"}  # a file of an exported model
OPTION_CLASSES = {  # prefix -> the classes whose options it holds
    "model.init_args.": ("lightning_modules.DiffusionClassifier", "lightning_modules.StableDiffusionClassifier",
                         "lightning_modules.BaselineClassifier"),
    "model.init_args.network.init_args.": ("networks.ClassConditionalUNet", "networks.DiT"),
    "data.init_args.": tuple(f"datamodules.{name}" for name in ("SyntheticDataModule", "CheXpertDataModule",
                             "ISICDataModule", "MedMNISTDataModule", "CSVDataModule", "ImagesDataModule",
                             "CombinedDataModule")),
    "trainer.": ("lightning.pytorch.Trainer",),
}  # fmt: skip


class Parsed(Exception):
    """Raised by the patched argparse once a tool's arguments are parsed: nothing after parsing runs."""


def commands_in(text: str) -> list[str]:
    """The command lines of a markdown page, in order: fenced blocks' lines (backslash continuations joined)
    and inline code spans (a span may wrap over lines)."""
    found = []
    for match in FENCE.finditer(text):
        block = re.sub(r"\\\n\s*", " ", match.group(0)).splitlines()[1:-1]
        found += [(match.start(), line) for line in block]
    prose = FENCE.sub(lambda match: " " * len(match.group(0)), text)
    found += [(match.start(), " ".join(match.group(1).split())) for match in INLINE.finditer(prose)]
    commands = []
    for _, line in sorted(found, key=lambda item: item[0]):
        line = ASSIGNMENT.sub("", line.strip(), count=1)
        if COMMAND.match(line):
            commands.append(line)
    return commands


def manual_commands() -> dict[str, list[str]]:
    """command line -> the pages it appears on."""
    where: dict[str, list[str]] = {}
    for page in MANUAL:
        for line in commands_in(page.read_text()):
            where.setdefault(line, []).append(str(page.relative_to(ROOT)))
    return where


def words(line: str) -> list[str]:
    """The line as the shell splits it, comments dropped, up to its first redirection or pipe."""
    split = shlex.split(line, comments=True)
    end = next((i for i, word in enumerate(split) if word in SHELL_OPERATORS or word.startswith((">", "|"))), None)
    split = split[:end]
    return split[:-1] if split and split[-1] == "..." else split


def readable_configs(args: list[str]) -> list[str]:
    """`--config` files that exist only after a run (under runs/) read as RUN_ONLY_CONFIG; any other config
    path is kept, so a misspelt configs/ file still fails."""
    out = []
    for i, word in enumerate(args):
        key, eq, value = word.partition("=")
        if key == "--config" and eq and value.startswith("runs/"):
            word = f"--config={RUN_ONLY_CONFIG}"
        elif i and args[i - 1] == "--config" and word.startswith("runs/"):
            word = RUN_ONLY_CONFIG
        out.append(word)
    return out


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        yield err


def last_error(stderr: str) -> str:
    """argparse's `prog: error: ...` line, not the usage before it."""
    lines = stderr.strip().splitlines() or ["(nothing on stderr)"]
    return next((line for line in reversed(lines) if "error" in line), lines[-1])


@contextlib.contextmanager
def help_text_off():
    """Without the settings' attribute docstrings, which cli.py reads for --help only: the same options, the
    parser built in a third of the time (each check builds the CLI's parser for all four subcommands)."""
    set_parsing_settings(docstring_parse_attribute_docstrings=False)
    try:
        yield
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=True)  # as cli.py sets it


def cli_problem(args: list[str]) -> str | None:
    """Why cli.py's parser refuses these arguments, or None when every option exists."""
    import cli

    help_asked = any(word in ("-h", "--help") or word.endswith(".help") for word in args)
    argv = readable_configs(args) + ([] if help_asked else ["--print_config"])  # --help exits by itself

    def instantiate(self):  # a safety net: --print_config exits before this
        raise Parsed(argv)

    with quiet() as err, mock.patch.object(cli.ExperimentCLI, "instantiate_classes", instantiate), help_text_off():
        try:
            cli.main(argv, exit_on_error=False)
        except SystemExit as stop:
            return None if stop.code in (0, None) else f"exit {stop.code}: {last_error(err.getvalue())}"
        except argparse.ArgumentError as error:
            return str(error)
        except Parsed:
            return None
    return "cli.main returned instead of stopping after parsing"


@contextlib.contextmanager
def stop_after_parsing():
    """argparse parses for real (an unknown option still exits 2), then raises Parsed instead of returning."""
    real_parse_args, real_parse_known_args = (
        argparse.ArgumentParser.parse_args,
        argparse.ArgumentParser.parse_known_args,
    )
    inside = []

    def parse_args(self, args=None, namespace=None):
        inside.append(self)
        try:
            namespace = real_parse_args(self, args, namespace)
        finally:
            inside.pop()
        raise Parsed(namespace)

    def parse_known_args(self, args=None, namespace=None):
        parsed = real_parse_known_args(self, args, namespace)
        if inside:  # parse_args's own call (or a subparser's): parse_args decides
            return parsed
        raise Parsed(parsed)

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args),
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_known_args),
    ):
        yield


def tool_problem(name: str, argv: list[str]) -> str | None:
    """Why tools.<name>'s parser refuses argv (and, after `--`, cli.py's), or None."""
    try:
        main = importlib.import_module(f"tools.{name}").main
    except (ImportError, AttributeError) as error:
        return f"tools.{name} has no main: {error}"
    takes_argv = bool(inspect.signature(main).parameters)
    with quiet() as err, stop_after_parsing(), mock.patch.object(sys, "argv", [f"tools/{name}.py", *argv]):
        try:
            main(argv) if takes_argv else main()
        except Parsed:
            pass
        except SystemExit as stop:
            if stop.code not in (0, None):
                return f"exit {stop.code}: {last_error(err.getvalue())}"
            return None  # --help
        else:
            return f"tools.{name}.main returned without parsing its arguments"
    if "--" in argv and name in TOOLS_PASSING_TO_CLI:
        extra = argv[argv.index("--") + 1 :]
        return cli_problem([TOOLS_PASSING_TO_CLI[name], f"--config={RUN_ONLY_CONFIG}", *extra])
    return None


@functools.cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([\w.-]+)\s*:(?!=)", text, flags=re.MULTILINE))


def problem(line: str) -> str | None:
    """Why a command line does not parse, or None."""
    return words_problem(tuple(words(line)))


@functools.cache
def words_problem(split: tuple[str, ...]) -> str | None:
    """Cached: each distinct command (the same words with another comment included) is parsed once."""
    split = list(split)
    if split[:2] == ["python", "cli.py"]:
        return cli_problem(split[2:])
    if split[:2] == ["python", "-m"] and split[2].startswith("tools."):
        return tool_problem(split[2].removeprefix("tools."), split[3:])
    if split[0] == "make":
        targets = [word for word in split[1:] if "=" not in word and not word.startswith("-")]
        missing = [target for target in targets if target not in make_targets()]
        return f"no make target {missing} in the Makefile" if missing else None
    return f"not a command this test knows: {shlex.join(split)}"


def options_in(text: str) -> set[str]:
    """The dotted option names in a page's inline code spans (`ood_*` and a trailing `.` kept as prefixes)."""
    prose = FENCE.sub("", text)
    found = set()
    for span in INLINE.findall(prose):
        for word in span.split():
            match = OPTION.match(word)
            if match and match.group(1) not in NOT_OPTIONS:
                found.add(match.group(1))
    return found


@functools.cache
def known_options() -> frozenset[str]:
    """Every option under model.init_args., data.init_args. and trainer., as the CLI lists them."""
    import cli

    with help_text_off():
        return frozenset(
            {"model.class_path", "data.class_path"}
            | {
                prefix + name
                for prefix, classes in OPTION_CLASSES.items()
                for class_path in classes
                for name in cli.class_option_names(class_path)
            }
        )


def option_exists(option: str) -> bool:
    """An option, a group of options (`model.init_args.calibration`), or a prefix written `ood_*` / `x.`."""
    option = option.removesuffix("+")  # trainer.callbacks+=...: appends to the list
    if option.endswith(("*", ".")):
        return any(name.startswith(option.rstrip("*")) for name in known_options())
    return option in known_options() or any(name.startswith(option + ".") for name in known_options())


COMMANDS = manual_commands()
OPTIONS = {option: page for page in MANUAL for option in options_in(page.read_text())}


def test_the_manual_has_command_lines_and_the_readme_starts_with_make_demo_and_make_test():
    readme = commands_in((ROOT / "README.md").read_text())
    assert [words(line) for line in readme[:2]] == [["make", "demo"], ["make", "test"]], readme[:2]
    kinds = {words(line)[0] + " " + words(line)[1] for line in COMMANDS}
    assert {"make demo", "python cli.py", "python -m"} <= kinds, kinds
    assert len(COMMANDS) >= 40, len(COMMANDS)


@pytest.mark.parametrize("line", sorted(set(COMMANDS) - set(SHOWN_FAILING)))
def test_every_command_line_of_the_manual_parses(line):
    found = problem(line)
    assert found is None, f"{', '.join(COMMANDS[line])}: `{line}`: {found}"


@pytest.mark.parametrize("line", sorted(SHOWN_FAILING))
def test_a_line_the_manual_shows_failing_fails_with_the_error_it_quotes(line):
    assert line in COMMANDS, f"no longer in the manual: {line}"
    assert problem(line) == SHOWN_FAILING[line]
    quoted = {" ".join(page.read_text().split()) for page in MANUAL if str(page.relative_to(ROOT)) in COMMANDS[line]}
    assert all(f"error: {SHOWN_FAILING[line]}" in text for text in quoted), "the manual quotes another message"


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("python cli.py fit --config configs/demo.yaml --model.init_args.no_such_option 1", "no_such_option"),
        ("python cli.py fit --config configs/demo.yaml --data.init_args.bach_size 8", "batch_size"),
        ("python cli.py test --config configs/demo.yaml --model.init_args.rule mean", "model.init_args.rule"),
        ("python cli.py fit --config configs/no_such_experiment.yaml", "no_such_experiment"),
        ("python -m tools.classify x.ckpt images/ --no-such-flag", "--no-such-flag"),
        ("python -m tools.classify x.ckpt images/ -- --trainer.no_such_option 1", "no_such_option"),
        ("python -m tools.benchmark --no-such-flag", "--no-such-flag"),
        ("make no-such-target", "no-such-target"),
    ],
)
def test_a_made_up_option_is_refused(line, named):
    """The same check as the manual's lines, on lines that must fail: naming what is wrong."""
    found = problem(line)
    assert found is not None and named in found, found


def test_every_option_named_in_the_prose_exists():
    wrong = sorted(f"{OPTIONS[option].relative_to(ROOT)}: {option}" for option in set(OPTIONS) - SHOWN_WRONG_OPTIONS
                   if not option_exists(option))  # fmt: skip
    assert not wrong, wrong


def test_the_options_shown_as_mistakes_do_not_exist():
    assert SHOWN_WRONG_OPTIONS <= set(OPTIONS), SHOWN_WRONG_OPTIONS - set(OPTIONS)
    assert not [option for option in SHOWN_WRONG_OPTIONS if option_exists(option)]


def test_a_made_up_option_in_the_prose_is_refused():
    """The README's old examples named options that do not exist; the lookup tells them from the real ones."""
    assert not option_exists("model.init_args.rule") and not option_exists("model.init_args.test_steps")
    assert not option_exists("model.network.init_args.conditioning")
    assert option_exists("model.init_args.classification.rule") and option_exists("model.init_args.calibration")
    assert option_exists("model.init_args.calibration.ood_*") and option_exists("trainer.callbacks+")
