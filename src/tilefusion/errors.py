"""Errors raised for users' mistakes, as opposed to bugs.

Every error that a user can cause by bad input is an :class:`InputError`. Its
message is one line that names the file (or config key) and the field, so the
CLI and the Snakemake rules print it without a traceback.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input: a malformed file, a missing tile, an invalid config value.

    Parameters
    ----------
    source : str
        The file path or config key the problem was found in.
    field : str
        The field (XML element, config key, array attribute) that is wrong.
    problem : str
        What is wrong and, where possible, how to fix it.
    """

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = str(source)
        self.field = field
        self.problem = problem
        where = f"{self.source}: {field}" if field else self.source
        super().__init__(f"{where}: {problem}")
