"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (bad recipe, missing dataset root, unknown
plugin, ...). The CLI prints its message, exits with status 2 and never shows a traceback.
Programming errors are any other exception and keep their traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by user input; ``messages`` holds one line per problem."""

    def __init__(self, messages: str | list[str]):
        if isinstance(messages, str):
            messages = [messages]
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


class RecipeError(UserError):
    """One or more problems in a recipe, each prefixed with its path (``$.attack.target``)."""

    def __init__(self, messages: list[str], source: str | None = None):
        self.source = source
        head = f"invalid recipe {source}:" if source else "invalid recipe:"
        if len(messages) == 1:
            super().__init__([f"{head} {messages[0]}"])
        else:
            super().__init__([f"{head} {len(messages)} problems"] + [f"  {m}" for m in messages])
        self.problems = list(messages)


class DivergedError(UserError):
    """Training produced a non-finite loss or weight: a setting (usually the learning rate) is
    wrong for this data, so it is the user's to fix, and the run stops with one line."""
