"""One module per `hsd-jax` subcommand; each defines `register(subparsers)`."""

import argparse


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with "(default: ...)": argparse's value, or the words of a
    help that names its default itself, as a person would ("(default: the suite's)" for an
    option whose value None means "take the suite's"), in place of "(default: None)".
    A positional argument is what the command works on, and has none."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or not action.option_strings:
            return action.help
        return super()._get_help_string(action)
