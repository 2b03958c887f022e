"""Names as a hostile user types them, for every layer that takes a name (library, API, CLI,
NBD): lone surrogates, NUL and other control characters, bidi and other format characters,
percent signs and encodings, ``?``, ``#``, slashes both ways, dots, spaces at the ends, very long
names, the empty name; and valid names that look like trouble (``a%20b``, ``a b``, ``?x``,
``#``, letters beyond ASCII), which must round-trip unchanged."""

from __future__ import annotations

from hypothesis import strategies as st

# Valid snapshot names that break naive URL building, shell scripts or NBD URIs.
TRICKY_VALID = ["a b", "a%20b", "x%20y", "x y", "?x", "#", "#x", "?", "%", "%2F", "%2e%2e",
                "a\\b", "\\", "100%", "a&b=c", "+", "~", "'", '"', "é-ü", "日本語", "Ωmega",
                "a;b", "a,b", "*", "<x>", "x" * 128, "...", ". x", "x .", "-", "--json", "-h"]
# Names no grammar should let through (for snapshots; disk names are stricter still).
HOSTILE = ["", ".", "..", "/", "a/b", "/a", "a/", "@", "a@b", "d0@", " a", "a ", " ", "\t",
           "a\nb", "\n", "\r", "\x00", "a\x00b", "\x1b[31mred", "\x7f", "\x85", "\u202e",
           "a\u202eb", "\u200b", "a\u200bb", "\ufeff", "\u2028", "\u00a0", "a\u00a0",
           "\ud800", "a\udcff", "\udfff", "x" * 129, "x" * 5000, "\ue000", "\U000e0001"]
# Characters that make names interesting, to mix into generated ones.
_PARTS = ["/", "\\", "%", "%2F", "%2f", "%00", "%25", "%20", "?", "#", "@", ".", "..", " ", "\t",
          "\n", "\x00", "\x01", "\x7f", "\u202e", "\u200b", "\ufeff", "\u00a0", "\ud800",
          "\udcff", "é", "日", "a", "Z", "0", "-", "_", "~", "+", "&", "=", ";"]


def name_parts(*, surrogates: bool = True, nul: bool = True) -> st.SearchStrategy[str]:
    parts = [p for p in _PARTS if (surrogates or not _has_surrogate(p))
             and (nul or "\x00" not in p)]
    chars = st.characters(exclude_categories=[] if surrogates else ["Cs"],
                          exclude_characters=None if nul else "\x00")
    return st.one_of(st.sampled_from(parts), chars)


def hostile_names(*, surrogates: bool = True, nul: bool = True) -> st.SearchStrategy[str]:
    """Any name at all, weighted towards trouble; valid ones come up too."""
    keep = [n for n in HOSTILE + TRICKY_VALID if (surrogates or not _has_surrogate(n))
            and (nul or "\x00" not in n)]
    mixed = st.lists(name_parts(surrogates=surrogates, nul=nul), max_size=12).map("".join)
    long = st.builds(lambda core, n: (core or "x") * n, mixed, st.integers(1, 200))
    return st.one_of(st.sampled_from(keep), mixed, long)


def tricky_valid_names() -> st.SearchStrategy[str]:
    return st.sampled_from(TRICKY_VALID)


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)
