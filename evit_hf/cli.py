"""The `evit-hf` command: `evit-hf visualize`, `evit-hf benchmark`, `evit-hf convert` and `evit-hf calibrate`, one
argparse subcommand each, defined in `evit_hf.commands`.

Every argument is checked before a model is built, and a bad one ends the command with argparse's one-line
`evit-hf COMMAND: error: ...` (exit status 2), never a traceback. Every command that writes follows the output policy
of `evit_hf.outputs`: it holds the lock on its output folder while it runs, writes nowhere near its inputs, and
overwrites only files that a run of this project wrote.
"""

import argparse
import sys

from .commands import benchmark, calibrate, convert, visualize


COMMANDS = {"visualize": visualize, "benchmark": benchmark, "convert": convert, "calibrate": calibrate}


class CommandListFormatter(argparse.HelpFormatter):
    """argparse's help, with each command's summary on its name's line: argparse sizes the name column from the
    options alone ("-h, --help"), which puts a longer command name on a line of its own."""

    def __init__(self, prog):
        super().__init__(prog)
        # The command names are listed indented by 4 (section, then sub-action).
        self._action_max_length = max(len(name) for name in COMMANDS) + 4


def build_parser(commands=None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `evit-hf` parser, and the parser of each command by name (a command's errors are its own parser's).

    Every command is listed; the options are added for `commands` only (default: all). Adding benchmark's reads its
    defaults from `evit_hf.benchmark`, a cost that `evit-hf convert` need not pay."""
    parser = argparse.ArgumentParser(
        prog="evit-hf",
        description="EViT for transformers. `evit-hf COMMAND --help` lists a command's options.",
        formatter_class=CommandListFormatter,
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    command_parsers = {}
    for name, command in COMMANDS.items():
        command_parser = subparsers.add_parser(
            name,
            prog=f"evit-hf {name}",  # not argparse's default, which repeats the main parser's usage
            help=command.SUMMARY,
            description=command.DESCRIPTION,
            formatter_class=getattr(command, "FORMATTER", argparse.HelpFormatter),
        )
        if commands is None or name in commands:
            command.add_arguments(command_parser)
        command_parsers[name] = command_parser
    return parser, command_parsers


def run_command(argv=None):
    """Runs `evit-hf` with `argv` (default: the process's arguments) and returns what the command returns: the
    converted model, the benchmark's results, the calibration report, the picture's path."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, command_parsers = build_parser(commands=argv[:1])
    if not argv:
        parser.error(
            f"give a command: {', '.join(list(COMMANDS)[:-1])} or {list(COMMANDS)[-1]} "
            "(evit-hf COMMAND --help for its options)"
        )
    if argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        parser.error(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)}")
    args, unrecognized = parser.parse_known_args(argv)
    command_parser = command_parsers[args.command]
    if unrecognized:  # left over by the command's parser: its error, as a stand-alone parser would give it
        command_parser.error(f"unrecognized arguments: {' '.join(unrecognized)}")
    return COMMANDS[args.command].run(command_parser, args, argv[1:])


def main(argv=None) -> None:
    """The `evit-hf` console command (its return value would become the exit status, so it returns nothing)."""
    run_command(argv)


if __name__ == "__main__":
    main()
