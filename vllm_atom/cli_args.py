"""Argument rules shared by ``vllm-atom`` and ``python -m vllm_atom.data`` (standard library only).

Every option of both command lines follows these rules; `rule_violations` checks a parser
against them and tests/test_cli_args.py runs it on both, so a new option that breaks one
fails the tests:

1. A numeric option parses with `Number` (``Number(int, lo=1)``, ``Number(float, 0, 1,
   lo_open=True)``), which names the allowed range: a bad value stops at parse time with
   ``argument --seqlen: 0 is not an integer >= 1``. Checks that need two options
   (``--max-tokens`` >= ``--seqlen``) call ``parser.error`` right after parsing.
2. Every option has a help text, and ``--help`` shows its default (`HelpFormatter`).
3. Directories and files that must exist are checked at parse time (`existing_dir`,
   `existing_file`); what is inside them (config.json, safetensors headers) is checked by
   `vllm_atom.inputs` before any long work.
4. An error is one line on stderr and exit status 2, no traceback (`Parser.error`; the
   commands turn their input errors into the same line, `error_line`).
5. Nothing is written to an output path before the inputs are known good.
"""

from __future__ import annotations

import argparse
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``PROG: error: MESSAGE (see PROG --help)``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {error_line(message)} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option that has a default other than None/False."""

    def _get_help_string(self, action):
        if action.default in (None, False, "", argparse.SUPPRESS) or not action.option_strings:
            return action.help
        return super()._get_help_string(action)


def error_line(message) -> str:
    """``message`` (an exception or a str) on one line."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


class Number:
    """argparse ``type=``: an int or float in [lo, hi] (``lo_open``: (lo, hi]; None: unbounded),
    optionally a multiple of ``multiple_of``; the error names the range."""

    def __init__(self, kind, lo=None, hi=None, *, lo_open: bool = False, multiple_of=None):
        if kind not in (int, float):
            raise TypeError(f"Number kind must be int or float, got {kind!r}")
        self.kind, self.lo, self.hi, self.lo_open, self.multiple_of = kind, lo, hi, lo_open, multiple_of
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.multiple_of:
            what = f"a multiple of {self.multiple_of}"
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{self.lo}, {self.hi}]"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None:
            return f"{what} <= {self.hi}"
        return what

    def __call__(self, s: str):
        try:
            v = self.kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {self.describe()}") from None
        ok = (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) and \
             (self.hi is None or v <= self.hi) and \
             (not self.multiple_of or v % self.multiple_of == 0) and v == v  # not NaN
        if not ok:
            raise argparse.ArgumentTypeError(f"{s} is not {self.describe()}")
        return v

    def __repr__(self):
        return f"Number({self.describe()})"


def existing_dir(s: str) -> Path:
    """argparse ``type=``: a directory that exists."""
    p = Path(s).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{s}: no such directory")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{s}: not a directory")
    return p


def existing_file(s: str) -> Path:
    """argparse ``type=``: a file that exists."""
    p = Path(s).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{s}: no such file")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{s}: not a file")
    return p


def rule_violations(parser: argparse.ArgumentParser) -> list[str]:
    """Where ``parser`` (and its subcommands) break rules 1 and 2 above; empty if nowhere."""
    bad = []

    def walk(p: argparse.ArgumentParser):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in dict.fromkeys(a.choices.values()):
                    walk(sub)
                continue
            if isinstance(a, argparse._HelpAction):
                continue
            name = f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
            if not a.help:
                bad.append(f"{name}: no help text")
            numeric_default = isinstance(a.default, (int, float)) and not isinstance(a.default, bool)
            if a.choices is None and (a.type in (int, float) or
                                      (numeric_default and not isinstance(a.type, Number))):
                bad.append(f"{name}: numeric without a Number(...) range")
            if not isinstance(p, Parser):
                bad.append(f"{p.prog}: not a cli_args.Parser (multi-line errors)")
        return bad

    walk(parser)
    return sorted(set(bad))
