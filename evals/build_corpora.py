"""Rebuild the bundled eval corpora in evals/data/ from Debian packages (run once by a maintainer).

Sources (see ../shared/ASSETS.md): `r-cran-janeaustenr` (six novels in an R lazy-load
database) and `python3.11-doc` (reST sources of the Python docs). The committed
files are the output; this script documents and reproduces how they were made:

    apt-get download r-cran-janeaustenr python3.11-doc
    for f in *.deb; do dpkg -x $f root; done
    python evals/build_corpora.py root
"""
from __future__ import annotations

import gzip
import struct
import sys
import zlib
from pathlib import Path

OUT = Path(__file__).parent / "data"
# Calibration and evaluation never share a book / a file.
AUSTEN_EVAL = "prideprejudice"
AUSTEN_CALIB = ("sensesensibility", "emma", "mansfieldpark", "northangerabbey", "persuasion")
PYDOCS_EVAL_DIRS = ("tutorial", "howto")
PYDOCS_CALIB_DIRS = ("library",)
PYDOCS_CALIB_CHARS = 2_000_000


class _RReader:
    """Just enough of R's XDR serialization format to read character vectors."""

    def __init__(self, data: bytes):
        self.d, self.p, self.refs = data, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.p)
        self.p += 4
        return v

    def read(self):
        assert self.d[:2] == b"X\n", "not an XDR R serialization"
        self.p = 2
        version = self._int()
        self._int(), self._int()
        if version == 3:
            skip = self._int()
            self.p += skip
        return self._item()

    def _item(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 242, 241, 251, 252, 247):
            return None
        if kind == 255:
            idx = flags >> 8 or self._int()
            return self.refs[idx - 1]
        if kind == 1:  # symbol
            sym = self._item()
            self.refs.append(sym)
            return sym
        if kind in (2, 6):  # pairlist
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            car, cdr = self._item(), self._item()
            return [(tag, car)] + (cdr or [])
        if kind == 9:
            n = self._int()
            if n == -1:
                return None
            s = self.d[self.p:self.p + n].decode("utf-8", "replace")
            self.p += n
            return s
        if kind in (16, 19, 20):
            out = [self._item() for _ in range(self._int())]
        elif kind in (10, 13):
            n = self._int()
            out = list(struct.unpack_from(f">{n}i", self.d, self.p))
            self.p += 4 * n
        elif kind == 14:
            n = self._int()
            out = list(struct.unpack_from(f">{n}d", self.d, self.p))
            self.p += 8 * n
        else:
            raise ValueError(f"unsupported R type {kind}")
        names = dict(self._item()).get("names") if has_attr else None
        return dict(zip(names, out)) if names else out


def read_rdata(lib: Path) -> dict[str, list[str]]:
    """Read every object of an R package's data/Rdata.rdb lazy-load database."""
    index = _RReader(gzip.decompress((lib / "Rdata.rdx").read_bytes())).read()
    blob = (lib / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[offset:offset + length]
        out[name] = _RReader(zlib.decompress(chunk[4:])).read()
    return out


def _write(name: str, text: str) -> None:
    path = OUT / f"{name}.txt.gz"
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    print(f"{path}: {len(text):,} chars")


def build(root: Path) -> None:
    """Write austen_{calib,eval} and pydocs_{calib,eval} under evals/data/."""
    OUT.mkdir(parents=True, exist_ok=True)
    books = read_rdata(root / "usr/lib/R/site-library/janeaustenr/data")
    join = lambda lines: "\n".join(line or "" for line in lines)  # noqa: E731
    _write("austen_eval", join(books[AUSTEN_EVAL]))
    _write("austen_calib", "\n\n".join(join(books[b]) for b in AUSTEN_CALIB))
    src = root / "usr/share/doc/python3.11/html/_sources"
    files = lambda dirs: sorted(p for d in dirs for p in (src / d).rglob("*.rst.txt"))  # noqa: E731
    _write("pydocs_eval", "\n\n".join(p.read_text() for p in files(PYDOCS_EVAL_DIRS)))
    calib = "\n\n".join(p.read_text() for p in files(PYDOCS_CALIB_DIRS))
    _write("pydocs_calib", calib[:PYDOCS_CALIB_CHARS])


if __name__ == "__main__":
    build(Path(sys.argv[1]))
