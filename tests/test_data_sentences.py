"""pysparse.data.sentences: offline prose, deterministic, disjoint splits, cached and rebuilt identically."""
import json

import pytest

from pysparse.data import sentences
from pysparse.data.sentences import _cache_dir


@pytest.fixture(scope="module")
def built():
    """Both splits, from the user's cache (built there on the first use on a machine, as by any caller)."""
    return {split: sentences(split) for split in ("train", "heldout")}


def test_enough_sentences_and_disjoint_splits(built):
    train, heldout = built["train"], built["heldout"]
    assert len(train) >= 5000 and len(heldout) >= 512
    assert not set(train) & set(heldout)
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    # about a tenth is held out
    assert 0.05 < len(heldout) / (len(train) + len(heldout)) < 0.15


def test_rebuilt_in_an_empty_cache_is_identical_and_cached(built, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))      # nothing cached there: built again from the sources
    assert _cache_dir() == tmp_path / "pysparse"
    assert {split: sentences(split) for split in built} == built
    files = list(_cache_dir().glob("sentences-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["splits"] == built
    assert {split: sentences(split) for split in built} == built   # now read from that file


def test_sentences_look_like_prose(built):
    for s in built["train"] + built["heldout"]:
        assert ">>>" not in s and "http" not in s.lower() and "`" not in s and "_" not in s, s
        assert 6 <= len(s.split()) <= 60 and s[0].isupper() and s[-1] in ".!?", s
        letters = sum(c.isalpha() for c in s.replace(" ", ""))
        assert letters >= 0.85 * len(s.replace(" ", "")), s


def test_limit_takes_the_first_sentences(built):
    first = built
    assert sentences("heldout", limit=7) == first["heldout"][:7]
    assert sentences("train", limit=0) == []
    assert sentences("heldout", limit=10**9) == first["heldout"]
    out = sentences("train", limit=3)
    out.append("changed")                                # the caller owns the list
    assert sentences("train", limit=3) == first["train"][:3]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"split": "test"}, ValueError, "split must be one of"),
    ({"split": "train", "limit": -1}, ValueError, "limit must be None or an int >= 0, got -1"),
    ({"split": "train", "limit": 2.5}, TypeError, "limit must be None or an int >= 0, got float"),
    ({"split": "train", "limit": True}, TypeError, "limit must be None or an int >= 0, got bool"),
])
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        sentences(**kwargs)
