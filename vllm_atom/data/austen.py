"""Jane Austen's six novels, from Debian's ``r-cran-janeaustenr``: `extract_austen`.

The .deb is unpacked with ``dpkg-deb -x`` and its R lazy-load data parsed with the PyPI
package ``rdata`` (R itself is not needed; ``rdata`` is imported only when used).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Optional, Sequence

from vllm_atom.data.packages import DataNotFoundError, PathLike, data_dir
from vllm_atom.data.texts import AUSTEN_DEB, AUSTEN_FILE

# Austen's novels in publication order (the order janeaustenr::austen_books() uses).
_AUSTEN_NOVELS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
_R_AUSTEN_DATA = Path("usr/lib/R/site-library/janeaustenr/data")


def _r_unserialize(raw: bytes):
    import rdata  # PyPI "rdata"

    with warnings.catch_warnings():
        # lazy-load blobs carry no RDS/RDA magic; rdata warns and assumes RDS
        warnings.simplefilter("ignore")
        parsed = rdata.parser.parse_data(raw)
        return rdata.conversion.convert(parsed)


def _r_lazyload_blob(blob: bytes) -> bytes:
    """Decompress one entry of an R lazy-load database (``.rdb``).

    Layout: 4-byte big-endian uncompressed length, then a zlib stream (R's
    compression type 1), or for types 2/3 a one-byte tag ('Z' zlib, '2' bzip2,
    'X' xz, '0' stored) before the payload.
    """
    n = int.from_bytes(blob[:4], "big")
    body = blob[4:]
    try:
        out = zlib.decompress(body)
    except zlib.error:
        tag, payload = body[:1], body[1:]
        if tag == b"Z":
            out = zlib.decompress(payload)
        elif tag == b"2":
            import bz2

            out = bz2.decompress(payload)
        elif tag == b"X":
            import lzma

            out = lzma.decompress(payload)
        elif tag == b"0":
            out = payload
        else:
            raise ValueError(f"unknown R lazy-load compression tag {tag!r}")
    if len(out) != n:
        raise ValueError(f"R lazy-load blob: expected {n} bytes, got {len(out)}")
    return out


def _read_austen_novels(rdata_dir: Path) -> dict:
    """Parse ``Rdata.rdx``/``Rdata.rdb`` of janeaustenr: {novel: [lines]}."""
    import gzip

    rdx = (rdata_dir / "Rdata.rdx").read_bytes()
    rdb = (rdata_dir / "Rdata.rdb").read_bytes()
    if rdx[:2] == b"\x1f\x8b":
        rdx = gzip.decompress(rdx)
    else:  # older R: same framing as the .rdb entries
        rdx = _r_lazyload_blob(rdx)
    index = _r_unserialize(rdx)
    variables = {str(k): v for k, v in index["variables"].items()}
    novels = {}
    for novel in _AUSTEN_NOVELS:
        if novel not in variables:
            raise ValueError(f"{rdata_dir}: no variable {novel!r} (have {sorted(variables)})")
        off, length = (int(x) for x in variables[novel])
        lines = _r_unserialize(_r_lazyload_blob(rdb[off : off + length]))
        novels[novel] = ["" if x is None else str(x) for x in lines]
    return novels


def _run(cmd: Sequence[str], cwd: Optional[Path] = None) -> None:
    try:
        subprocess.run(list(cmd), cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise DataNotFoundError(f"`{cmd[0]}` is not available (needs a Debian system)") from e
    except subprocess.CalledProcessError as e:
        raise DataNotFoundError(
            f"`{' '.join(cmd)}` failed (exit {e.returncode}): {e.stderr.strip()[-500:]}"
            + (" -- try `apt-get update` first" if cmd[0] == "apt-get" else "")
        ) from e


def extract_austen(out_path: Optional[PathLike] = None, *, deb: Optional[PathLike] = None) -> Path:
    """Write Jane Austen's six novels as one UTF-8 text file and return its path.

    Source, in this order: the ``.deb`` given as ``deb``; an installed
    ``r-cran-janeaustenr`` (``/usr/lib/R/site-library/janeaustenr``); otherwise
    ``apt-get download r-cran-janeaustenr`` into a temporary folder.  The .deb is
    unpacked with ``dpkg-deb -x`` and the R lazy-load data parsed with PyPI
    ``rdata`` (R itself is not needed).  Novels are in publication order, one text
    line per line, separated by blank lines.  ``out_path`` defaults to
    ``data_dir()/austen.txt`` (where :func:`find_text` looks).
    """
    out = Path(out_path).expanduser() if out_path is not None else data_dir() / AUSTEN_FILE
    try:
        import rdata  # noqa: F401
    except ImportError as e:
        raise DataNotFoundError("extract_austen needs the PyPI package 'rdata' (pip install rdata)") from e

    with tempfile.TemporaryDirectory(prefix="vllm-atom-austen-") as tmp:
        tmpd = Path(tmp)
        installed = Path("/") / _R_AUSTEN_DATA
        if deb is not None:
            _run(["dpkg-deb", "-x", str(Path(deb).resolve()), str(tmpd / "x")])
            rdir = tmpd / "x" / _R_AUSTEN_DATA
        elif (installed / "Rdata.rdx").is_file():
            rdir = installed
        else:
            _run(["apt-get", "download", AUSTEN_DEB], cwd=tmpd)
            debs = sorted(tmpd.glob(f"{AUSTEN_DEB}_*.deb"))
            if not debs:
                raise DataNotFoundError(f"apt-get download {AUSTEN_DEB} produced no .deb")
            _run(["dpkg-deb", "-x", str(debs[-1]), str(tmpd / "x")])
            rdir = tmpd / "x" / _R_AUSTEN_DATA
        if not (rdir / "Rdata.rdx").is_file():
            raise DataNotFoundError(f"{rdir}/Rdata.rdx missing: not a {AUSTEN_DEB} package?")
        novels = _read_austen_novels(rdir)

    text = "\n\n\n".join("\n".join(lines).strip("\n") for lines in novels.values()) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(text, encoding="utf-8")
    os.replace(tmp_out, out)
    return out

