"""The base of the errors a user can cause and fix: a setting, a file or the machine is not as a
command needs it. Every command shows one as a single line, without a traceback
(``vae_lightning.cli.one_line_errors``); each is defined beside the code that raises it."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type's name when it has none: the reason
    a one-line message quotes from a library's error."""
    return str(err).splitlines()[0] if str(err).strip() else type(err).__name__


class UserError(Exception):
    """Its message says what is wrong and what to do; ``label`` starts the line shown."""

    label = "Error"


class ConfigError(UserError, ValueError):
    """A setting has a value that is not allowed; the message names the key and what is."""

    label = "Invalid configuration"
