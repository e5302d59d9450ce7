"""Rebuild the bundled eval corpora in evals/data/ from Debian packages (run once by a maintainer).

Six domains, each from a Debian package (see ../shared/ASSETS.md); calibration and
evaluation parts never share a book, a file, a chapter or a dictionary letter:

  austen    fiction      r-cran-janeaustenr (six novels in an R lazy-load database)
  pydocs    tech docs    python3.11-doc (reST sources of the Python documentation)
  pycode    source code  libpython3.11-stdlib (the Python standard library's .py files)
  fortunes  quotations   fortunes (epigrams, jokes, verse, quotes; one file per topic)
  gcide     dictionary   dict-gcide (Webster's 1913 + WordNet definitions)
  debref    manual       debian-reference-en (the Debian Reference, HTML chapters)

The committed files are the output; this script documents and reproduces how they were made:

    apt-get download r-cran-janeaustenr python3.11-doc libpython3.11-stdlib fortunes \
        dict-gcide debian-reference-en
    for f in *.deb; do dpkg -x $f root; done
    python evals/build_corpora.py root
"""
from __future__ import annotations

import gzip
import html.parser
import re
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
CALIB_CHARS = 2_000_000          # cap of every calibration part
EVAL_CHARS = 400_000             # cap of the new domains' eval parts (~100k tokens)
PYCODE_EVAL_EVERY = 5            # every 5th .py file (sorted by path) is eval text
FORTUNES_EVAL = ("people", "science", "politics", "work", "literature", "love", "wisdom")
GCIDE_EVAL_LETTERS = ("P", "R")
DEBREF_EVAL = ("ch09", "ch10")


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


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page, one line per block element."""

    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "pre", "table", "dt", "dd"}

    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_text(page: str) -> str:
    p = _HTMLText()
    p.feed(page)
    text = "".join(p.parts)
    return re.sub(r"\n\s*\n+", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()


def _spread(pieces: list[str], cap: int) -> str:
    """Pieces joined by blank lines, taking every k-th so that about `cap` chars come from
    all over the source rather than its first part."""
    total = sum(len(p) for p in pieces) or 1
    step = max(1, round(total / cap))
    return "\n\n".join(pieces[::step])[:cap]


def _gcide_entries(root: Path) -> dict[str, list[str]]:
    text = gzip.decompress((root / "usr/share/dictd/gcide.dict.dz").read_bytes()).decode("utf-8", "replace")
    by_letter: dict[str, list[str]] = {}
    for entry in re.split(r"\n\s*\n", text):
        head = entry.lstrip()[:1].upper()
        if head.isalpha() and "\\" in entry.split("\n", 1)[0]:   # headword lines carry \pro*nun*ci*a"tion\
            by_letter.setdefault(head, []).append(entry.strip())
    return by_letter


def build(root: Path) -> None:
    """Write {austen,pydocs,pycode,fortunes,gcide,debref}_{calib,eval} under evals/data/."""
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
    py = sorted(p for p in (root / "usr/lib/python3.11").rglob("*.py") if p.is_file() and not p.is_symlink())
    code = lambda ps: [f"# {p.relative_to(root)}\n{p.read_text(errors='replace')}" for p in ps]  # noqa: E731
    _write("pycode_eval", _spread(code(py[::PYCODE_EVAL_EVERY]), EVAL_CHARS))
    _write("pycode_calib", _spread(code([p for i, p in enumerate(py) if i % PYCODE_EVAL_EVERY]), CALIB_CHARS))
    fdir = root / "usr/share/games/fortunes"
    ftopics = sorted(p for p in fdir.iterdir() if "." not in p.name and p.is_file())
    quotes = lambda ps: [q.strip() for p in ps for q in p.read_text(errors="replace").split("\n%\n") if q.strip()]  # noqa: E731
    ev = _spread(quotes([p for p in ftopics if p.name in FORTUNES_EVAL]), EVAL_CHARS)
    _write("fortunes_eval", ev)
    # topic files share quotes (wrapped differently): calibration drops any quote that has a
    # run of 8 words in common with the eval text
    shingles = lambda t: {" ".join(w[i:i + 8]) for w in [t.split()] for i in range(len(w) - 7)}  # noqa: E731
    seen = shingles(ev)
    fresh = [q for q in quotes([p for p in ftopics if p.name not in FORTUNES_EVAL])
             if not shingles(q) & seen]
    _write("fortunes_calib", _spread(fresh, CALIB_CHARS))
    letters = _gcide_entries(root)
    pick = lambda keep: [e for k in sorted(letters) if keep(k) for e in letters[k]]  # noqa: E731
    _write("gcide_eval", _spread(pick(lambda k: k in GCIDE_EVAL_LETTERS), EVAL_CHARS))
    _write("gcide_calib", _spread(pick(lambda k: k not in GCIDE_EVAL_LETTERS), CALIB_CHARS))
    pages = sorted((root / "usr/share/debian-reference").glob("*.en.html"))
    page = lambda ps: [html_text(p.read_text(errors="replace")) for p in ps]  # noqa: E731
    _write("debref_eval", _spread(page([p for p in pages if p.name[:4] in DEBREF_EVAL]), EVAL_CHARS))
    _write("debref_calib", _spread(page([p for p in pages if p.name[:4] not in DEBREF_EVAL
                                          and not p.name.startswith("index")]), CALIB_CHARS))


if __name__ == "__main__":
    build(Path(sys.argv[1]))
