"""English sentences that ship offline: prose from the documentation installed with pysparse's dependencies.

Where the text comes from: the docstrings (every triple-quoted string) in the ``.py`` / ``.pyi`` files of the
packages in :data:`SOURCES` that are installed (torch, numpy and tqdm always are; transformers, scikit-learn,
torchvision and matplotlib when the optional extras are), and the long description (the README) in each one's
installed ``METADATA``. Nothing is downloaded and nothing is imported: the files are read as text.

Cleaning keeps prose only: doctest lines, code blocks, section headers, parameter lists, tables and markup are
dropped, and a sentence must be 6-60 words of ASCII text, mostly letters and mostly lower-case words, start with a
capital letter and end with ``.``, ``!`` or ``?``, with no URL and no dotted or underscored identifiers. Duplicates
(ignoring case) are dropped. A sentence goes to the held-out split when a stable hash of it (SHA-256, not Python's
salted ``hash``) falls in the lowest tenth, and each split is ordered by that hash: a reproducible shuffle, so the
first ``limit`` sentences are a fair sample of the split.

The result is cached as JSON under ``$XDG_CACHE_HOME/pysparse`` (``~/.cache/pysparse`` by default), keyed by the
installed versions of the packages read and by the cleaning rules' version, so a changed environment rebuilds it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import tempfile
from numbers import Integral
from pathlib import Path

__all__ = ["SOURCES", "SPLITS", "sentences"]

# (import name, distribution name): the project's dependencies and optional extras that carry English prose.
SOURCES = (("torch", "torch"), ("numpy", "numpy"), ("tqdm", "tqdm"), ("transformers", "transformers"),
           ("sklearn", "scikit-learn"), ("torchvision", "torchvision"), ("matplotlib", "matplotlib"))
SPLITS = ("train", "heldout")
HELDOUT_SHARE = 10          # percent of sentences in the held-out split
_RULES_VERSION = 1          # bump when the cleaning rules change: the cache key includes it

# A regex over the file text instead of ast: parsing ~150 MB of sources takes a minute, the regex a second.
_TRIPLE_QUOTED = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.DOTALL)
_MARKUP = [
    (re.compile(r":[\w:.-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`"), r"\1"),   # :class:`Foo`, :ref:`text <target>`
    (re.compile(r"`+([^`]*)`+_?"), r"\1"),                             # ``literal``, `text`, `link`_
    (re.compile(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*"), r"\1\2"),        # **bold**, *emphasis*
    (re.compile(r"\[(\d+|#\w*)\]_"), ""),                               # citations [1]_
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),                     # markdown [text](link)
]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ALLOWED = re.compile(r"[A-Za-z0-9 ,.;:'\"!?()\-]+")
_IDENTIFIER = re.compile(r"\w[._]\w")
# Lines that start a non-prose construct: doctests, shell, tables, markdown headers, images, HTML, list items.
_NOT_PROSE = (">>>", "...", "$ ", "|", "#", "!", "<", "- ", "* ", "+ ", ".. ", "```")
_HEADER = re.compile(r"^([-=~^*#]{3,}|Parameters|Returns|Yields|Raises|Examples?|Notes?|See Also|References)$")


def _prose_paragraphs(text: str):
    """Paragraphs of ``text`` (a docstring or a README) that can hold prose, each joined into one line.

    Prose is unindented (after ``inspect.cleandoc``): indented lines are parameter descriptions, literal blocks
    and continuation lines of lists, none of them whole sentences. Fenced (```) blocks are code.
    """
    paragraph: list[str] = []
    fenced = False
    for line in inspect.cleandoc(text).splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
        prose = (stripped and not fenced and not line[:1].isspace() and not stripped.startswith(_NOT_PROSE)
                 and not stripped.endswith(":") and not _HEADER.match(stripped))
        if prose:
            paragraph.append(stripped)
        elif paragraph:
            yield " ".join(paragraph)
            paragraph = []


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 60 or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if not sentence.isascii() or not _ALLOWED.fullmatch(sentence) or _IDENTIFIER.search(sentence):
        return False
    lowered = sentence.lower()
    if "http" in lowered or "www" in lowered:
        return False
    chars = sentence.replace(" ", "")
    if sum(c.isalpha() for c in chars) < 0.85 * len(chars):
        return False
    plain = sum(w.strip(",.;:'\"!?()").isalpha() and w.strip(",.;:'\"!?()").islower() for w in words)
    return plain >= 0.6 * len(words)


def _sentences_of(text: str):
    for paragraph in _prose_paragraphs(text):
        for pattern, repl in _MARKUP:
            paragraph = pattern.sub(repl, paragraph)
        for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
            if _is_prose(sentence):
                yield sentence


def _installed() -> list[tuple[str, str, Path]]:
    """``(import name, version, directory)`` of each source package that is installed."""
    found = []
    for module, dist in SOURCES:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            continue
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        found.append((module, version, Path(next(iter(spec.submodule_search_locations)))))
    return found


def _texts(module: str, directory: Path):
    """The package's README (from its METADATA), then every triple-quoted string of its sources, in path order."""
    dist = dict(SOURCES)[module]
    try:
        metadata = importlib.metadata.distribution(dist).read_text("METADATA") or ""
    except importlib.metadata.PackageNotFoundError:
        metadata = ""
    # The long description follows the first blank line of the e-mail-style header.
    yield metadata.partition("\n\n")[2]
    for path in sorted(p for p in directory.rglob("*.py*") if p.suffix in (".py", ".pyi")):
        try:
            source = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for match in _TRIPLE_QUOTED.finditer(source):
            yield match.group(1) if match.group(1) is not None else match.group(2)


def _rank(sentence: str) -> int:
    return int.from_bytes(hashlib.sha256(sentence.encode()).digest()[:8], "big")


def _build(packages) -> dict[str, list[str]]:
    seen: dict[str, str] = {}
    for module, _, directory in packages:
        for text in _texts(module, directory):
            for sentence in _sentences_of(text):
                seen.setdefault(sentence.lower(), sentence)
    ordered = sorted(seen.values(), key=lambda s: (_rank(s), s))
    heldout = [s for s in ordered if _rank(s) % 100 < HELDOUT_SHARE]
    train = [s for s in ordered if _rank(s) % 100 >= HELDOUT_SHARE]
    return {"train": train, "heldout": heldout}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pysparse"


def _load_or_build() -> dict[str, list[str]]:
    packages = _installed()
    key = hashlib.sha256(json.dumps([_RULES_VERSION, [(m, v) for m, v, _ in packages]]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"sentences-{key}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError):
        pass
    splits = _build(packages)
    record = {"sources": {m: v for m, v, _ in packages}, "rules_version": _RULES_VERSION, "splits": splits}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a reader never sees half a file, even with two processes building at once.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(f.name, path)
    except OSError:
        pass    # an unwritable cache only costs a rebuild next time
    return splits


def sentences(split: str = "train", limit: int | None = None) -> list[str]:
    """English sentences from the documentation installed with pysparse's dependencies (see the module docstring).

    Args:
        split: ``"train"`` (about 90%) or ``"heldout"`` (about 10%, disjoint from train).
        limit: return only the first ``limit`` sentences of the split (all of them when it has fewer); the
            order is fixed by a hash of each sentence, so the result is the same on every call and machine with
            the same package versions.
    Returns:
        a new list of sentences; the first call builds and caches them (a few seconds), later calls read the cache.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, Integral):
            raise TypeError(f"limit must be None or an int >= 0, got {type(limit).__name__}")
        if limit < 0:
            raise ValueError(f"limit must be None or an int >= 0, got {limit}")
    chosen = _load_or_build()[split]
    return list(chosen if limit is None else chosen[:int(limit)])
