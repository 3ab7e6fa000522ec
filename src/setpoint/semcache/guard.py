"""A lexical guard for semantic-cache hits: `guard(query, cached)` -> why the hit must be refused, or None.

Sentence embeddings place a question and its reversal close together ("enable 2FA" / "disable 2FA"
score 0.91 with all-MiniLM-L6-v2, above "enable 2FA" / "turn on 2FA" at 0.89), and they barely see
numbers or names ("top 5" / "top 10", "Paris" / "Lyon"). No single threshold separates those, so a
hit must also pass five cheap checks; any difference refuses it (the caller then calls the model):

1. **numbers**: digits with their unit (`5`, `5%`, `$5`, `5k`, `3.11`, `1.2.3`, `2024-01-05`, `10:30`,
   `1st`) and written numbers `zero`..`twenty`, the tens, `hundred`..`billion`, `dozen`, `half`, ordinals
   up to `tenth` ("five" and "5" are the same number). Also month and weekday names, `today`,
   `tomorrow`, `yesterday`, `tonight`, and relative periods (`last week`, `this month`, `next year`).
2. **negation**: the count of negation cues differs (`not`, `no`, `never`, `n't`, `cannot`, `without`,
   `none`, `nothing`, `neither`, `nor`, `unable`, `non-`...).
3. **antonyms**: the two texts take opposite sides of a pair in `ANTONYMS` (enable/disable, turn on/turn
   off, start/stop, add/remove, allow/deny, increase/decrease, before/after, min/max, ...), or one has a
   word and the other its negated form (`lock`/`unlock`, `valid`/`invalid`, `connect`/`disconnect`).
   A side present in one text and absent from the other is not a conflict.
4. **entities**: a name in one text does not occur in the other: capitalised words not at a sentence
   start, acronyms (`SSO`, `2FA`), quoted strings, code identifiers (`snake_case`, `camelCase`,
   `dotted.names`, `calls()`, `--flags`, paths, file names), emails, URLs, and the lower-case names in
   `KNOWN_NAMES` (languages, platforms, databases, clouds: "python" / "java" is a difference), and
   names that are also words (`go`, `rust`, `swift`...) right after a preposition ("in go").
5. **direction**: "convert X to Y" / "Y to X" (also into, vs, over, than, skipping articles), and the
   same names in another order ("Is Python faster than Java?" / "Is Java faster than Python?").
   Mean-pooled embeddings hardly see word order: these pairs score 0.99.

It is deliberately strict: a refused paraphrase costs one model call, a wrong hit serves a wrong answer.
Pure Python; a check is about 20-40 us for short questions, and the features of a text are memoised
(cached entries are checked again and again).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

__all__ = ["ANTONYMS", "KNOWN_NAMES", "NEGATIONS", "Features", "features", "guard"]

NEGATIONS: frozenset[str] = frozenset({
    "not", "no", "never", "cannot", "without", "none", "nothing", "nobody", "nowhere", "neither", "nor",
    "unable", "non", "dont", "doesnt", "didnt", "cant", "couldnt", "wont", "wouldnt", "shouldnt", "isnt",
    "arent", "wasnt", "werent", "havent", "hasnt", "hadnt", "aint", "mustnt", "neednt",
})

# Each row is two opposite sides; each side lists base forms (verbs are inflected automatically:
# -s, -es, -ed, -d, -ing, doubled consonant). Multi-word entries inflect their first word.
ANTONYMS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("enable", "turn on", "switch on", "activate", "opt in"),
     ("disable", "turn off", "switch off", "deactivate", "opt out")),
    (("start", "launch", "resume", "begin"), ("stop", "halt", "pause", "end", "terminate", "kill")),
    (("add", "insert", "attach", "append"), ("remove", "delete", "detach", "drop", "strip")),
    (("create",), ("delete", "destroy", "drop")),
    (("allow", "permit", "accept", "approve", "grant", "whitelist", "allowlist"),
     ("deny", "forbid", "reject", "block", "refuse", "revoke", "blacklist", "blocklist", "ban")),
    (("increase", "raise", "grow", "extend", "expand"), ("decrease", "lower", "reduce", "shrink", "cut")),
    (("before", "earlier", "prior to"), ("after", "later")),
    (("min", "minimum", "minimal", "minimize", "minimise", "smallest", "lowest", "least", "fewest"),
     ("max", "maximum", "maximal", "maximize", "maximise", "largest", "biggest", "highest", "most")),
    (("more", "higher", "larger", "bigger", "greater", "above", "longer", "faster"),
     ("less", "fewer", "lower", "smaller", "below", "shorter", "slower")),
    (("first", "earliest", "oldest", "top", "head", "beginning"),
     ("last", "latest", "newest", "bottom", "tail", "end")),
    (("next", "following", "upcoming"), ("previous", "prior", "last", "preceding")),
    (("upload", "import", "push", "send"), ("download", "export", "pull", "receive")),
    (("install", "subscribe", "upgrade", "encrypt", "encode", "compress", "zip", "mount", "lock", "freeze",
      "mute", "follow", "pin", "archive", "connect", "merge", "join"),
     ("uninstall", "unsubscribe", "downgrade", "decrypt", "decode", "decompress", "unzip", "unmount",
      "unlock", "unfreeze", "unmute", "unfollow", "unpin", "unarchive", "disconnect", "split", "leave")),
    (("open",), ("close", "shut")),
    (("show", "display", "reveal", "unhide"), ("hide", "conceal", "mask")),
    (("include", "including"), ("exclude", "excluding", "except")),
    (("log in", "login", "sign in", "signin", "sign up", "signup", "register"),
     ("log out", "logout", "sign out", "signout", "log off", "deregister")),
    (("buy", "purchase", "deposit", "credit", "charge"), ("sell", "withdraw", "debit", "refund")),
    (("read", "input", "inbound", "incoming", "ingress"), ("write", "output", "outbound", "outgoing", "egress")),
    (("public", "external", "shared"), ("private", "internal")),
    (("sync", "synchronous", "synchronously", "blocking"), ("async", "asynchronous", "asynchronously")),
    (("ascending", "asc", "increasing"), ("descending", "desc", "decreasing")),
    (("upper", "uppercase"), ("lower", "lowercase")),
    (("left",), ("right",)), (("horizontal", "horizontally"), ("vertical", "vertically")),
    (("up",), ("down",)), (("inner",), ("outer",)), (("forward", "forwards"), ("backward", "backwards")),
    (("true",), ("false",)),
    (("success", "successful", "succeed", "pass", "passing"), ("failure", "fail", "failing")),
    (("light",), ("dark",)), (("short",), ("long",)), (("cheap", "cheapest", "cheaper"),
                                                       ("expensive", "priciest", "pricier")),
    (("best",), ("worst",)), (("monthly",), ("annual", "annually", "yearly")),
    (("weekly",), ("daily",)), (("client", "frontend", "front-end"), ("server", "backend", "back-end")),
    (("shallow",), ("deep",)), (("strong",), ("weak",)), (("valid",), ("invalid",)),
    (("online",), ("offline",)), (("static",), ("dynamic",)), (("mutable",), ("immutable",)),
    (("encrypted",), ("unencrypted", "plaintext")), (("all", "every"), ("some", "none")),
)

# Names that users type in lower case, so the capitalisation rule cannot see them.
KNOWN_NAMES: frozenset[str] = frozenset("""
python java javascript typescript kotlin scala ruby php perl haskell elixir erlang clojure golang rustlang
lua dart julia matlab fortran cobol bash zsh powershell sql nosql graphql html css sass json yaml toml xml
csv react vue angular svelte django flask fastapi rails laravel nextjs nuxt jquery pandas numpy
pytorch tensorflow keras pyspark hadoop kafka rabbitmq nginx tomcat docker kubernetes k8s helm
terraform ansible jenkins git github gitlab bitbucket npm yarn pnpm pip conda poetry maven gradle webpack
vite linux windows macos ios android ubuntu debian fedora centos alpine chrome firefox safari
postgres postgresql mysql mariadb sqlite redis mongodb mongo cassandra dynamodb elasticsearch oracle
aws azure gcp heroku vercel netlify cloudflare s3 ec2 slack outlook gmail excel powerpoint
paypal stripe mastercard amex iphone ipad macbook openai anthropic gpt claude gemini llama mistral
""".split())

_WORD_NUMBERS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
    "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60",
    "seventy": "70", "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000",
    "million": "1000000", "billion": "1000000000", "dozen": "12", "half": "0.5", "twice": "x2",
    "double": "x2", "triple": "x3", "first": "#1", "second": "#2", "third": "#3", "fourth": "#4",
    "fifth": "#5", "sixth": "#6", "seventh": "#7", "eighth": "#8", "ninth": "#9", "tenth": "#10",
}
_TEMPORAL = frozenset(
    "january february march april june july august september october november december jan feb apr jun "
    "jul aug sep sept oct nov dec mar monday tuesday wednesday thursday friday saturday sunday today tomorrow "
    "yesterday tonight weekend weekday morning evening night noon midnight".split())
_RELATIVE = {"last": "last", "previous": "last", "past": "last", "this": "this", "current": "this",
             "next": "next", "coming": "next"}
_PERIODS = frozenset({"day", "week", "weekend", "month", "quarter", "year", "night", "morning", "evening",
                      "season", "sprint", "release", "version", "cycle"})
_PER = frozenset({"a", "one", "per", "each", "every", "split", "fraction", "milli", "nano", "micro"})
_ONE_AS_PRONOUN = frozenset({"which", "this", "that", "the", "any", "each", "every", "no", "some", "another",
                             "one", "new", "other", "right", "wrong", "better", "best", "only"})

_APOS = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
_PERCENT = re.compile(r"\s*\bper\s?cent\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])([$€£¥]\s?|v)?(\d+(?:[.,:/-]\d+)*)(%|[a-z]{1,4})?(?!\w)", re.IGNORECASE)
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+")
_DECIMAL = re.compile(r"\d+(?:\.\d+)?")
_DIGIT = re.compile(r"\d")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_QUOTED = re.compile(r"\"([^\"\n]{1,200})\"|`([^`\n]{1,200})`|(?<![\w])'([^'\n]{2,200})'(?![\w])")
_EDGE = " \t,;:!?\"'`[]{}<>*"  # stripped from both ends of a whitespace token
_CLOSERS = "\"')]}*`"
_SPECIAL_NAMES = frozenset({"c++", "c#", "f#", ".net"})
_NOT_NAMES = frozenset({"i", "i'm", "i've", "i'd", "i'll", "ok", "okay"})
_NOT_CODE = frozenset({"e.g", "i.e", "etc", "vs", "a.m", "p.m"})
# Names that are also common words: counted only right after a preposition ("in go", "with rust").
_CONTEXT_NAMES = frozenset({"go", "rust", "swift", "r", "c", "dart", "ruby", "spring", "edge", "elm", "zig",
                            "crystal", "nim", "ada", "pascal", "prolog", "scheme", "racket", "ocaml"})
_PREPOSITIONS = frozenset({"in", "with", "using", "to", "for", "on", "from", "into", "via"})
# "convert X to Y": the words around these are an ordered pair; "Y to X" is the opposite direction.
_ARROWS = frozenset({"to", "into", "vs", "versus", "over", "than"})
_FILLER = frozenset({"a", "an", "the", "my", "our", "your", "their", "this", "that", "these", "those", "some"})


def _inflect(base: str) -> set[str]:
    """Regular inflections of a base form (`stop` -> stops, stopped, stopping, ...)."""
    head, sep, rest = base.replace("-", " ").partition(" ")
    forms = {head, head + "s", head + "es", head + "ed", head + "d", head + "ing"}
    if head.endswith("e"):
        forms.add(head[:-1] + "ing")
    if head.endswith("y"):
        forms |= {head[:-1] + "ies", head[:-1] + "ied"}
    if len(head) >= 3 and head[-1] not in "aeiouwxy" and head[-2] in "aeiou":
        forms |= {head + head[-1] + "ed", head + head[-1] + "ing"}
    return {f + sep + rest for f in forms}


@lru_cache(maxsize=1)
def _antonym_table() -> dict[str, tuple[tuple[int, int], ...]]:
    """inflected form (one word, or two words joined by a space) -> ((group, side), ...); built on first use."""
    table: dict[str, list[tuple[int, int]]] = {}
    for group, sides in enumerate(ANTONYMS):
        for side, words in enumerate(sides):
            for w in words:
                for form in _inflect(w):
                    refs = table.setdefault(form, [])
                    if (group, side) not in refs:
                        refs.append((group, side))
    return {k: tuple(v) for k, v in table.items()}


_PREFIXES = ("un", "dis", "de", "non", "in", "im", "il", "ir")


class Features(NamedTuple):
    """What the guard compares, extracted once per text."""

    numbers: frozenset[str]
    negations: int
    sides: frozenset[tuple[int, int, str]]  # (antonym group, side, the word as written)
    arrows: frozenset[tuple[str, str]]  # ordered (x, y) around "to"/"into"/"vs"/"than"/...
    words: frozenset[str]  # lower-case words, for entity and prefix checks
    prefixed: frozenset[tuple[str, str]]  # (stem, prefix) of words like unlock, invalid, disconnect
    names: frozenset[str]  # lower-case entities that must occur in the other text
    order: tuple[str, ...]  # those names in order of first appearance
    text: str  # the words joined by spaces (substring checks)


def _numbers(text: str, words: list[str]) -> set[str]:
    found: set[str] = set()
    for prefix, raw, suffix in _NUMBER.findall(text) if _DIGIT.search(text) else ():
        value = raw.replace(",", "") if _THOUSANDS.fullmatch(raw) else raw
        unit = suffix.lower()
        currency = prefix.strip() if prefix.lower() != "v" else ""
        if unit == "k" and _DECIMAL.fullmatch(value):
            value, unit = repr(float(value) * 1000).removesuffix(".0"), ""
        elif unit in ("st", "nd", "rd", "th"):
            value, unit = "#" + value, ""
        elif unit == "x":
            value, unit = "x" + value, ""
        found.add(f"{currency}{value}{unit}")
    words = [w.removesuffix("'s") for w in words]
    for i, w in enumerate(words):
        prev = words[i - 1] if i else ""
        if prev in _RELATIVE and w in _PERIODS:
            found.add(f"{_RELATIVE[prev]} {w}")  # last week, this month, next year
        n = _WORD_NUMBERS.get(w)
        if n is not None:
            if w == "one" and prev in _ONE_AS_PRONOUN:
                continue
            if w == "second" and (prev.isdigit() or prev in _PER):
                continue  # a unit of time, not an ordinal
            found.add(n)
        elif w in _TEMPORAL:
            found.add(w[:3] if w[:3] in _TEMPORAL else w)
    return found


def _sides(words: list[str]) -> set[tuple[int, int, str]]:
    found: set[tuple[int, int, str]] = set()
    table = _antonym_table()
    i, n = 0, len(words)
    while i < n:
        if i + 1 < n:
            pair = words[i] + " " + words[i + 1]
            refs = table.get(pair)
            if refs:
                found.update((g, s, pair) for g, s in refs)
                i += 2
                continue
        refs = table.get(words[i])
        if refs:
            found.update((g, s, words[i]) for g, s in refs)
        i += 1
    return found


def _arrows(words: list[str]) -> frozenset[tuple[str, str]]:
    """(x, y) for "x to y", skipping articles and possessives: "a list to a string" -> (list, string)."""
    pairs: set[tuple[str, str]] = set()
    for i, w in enumerate(words):
        if w not in _ARROWS:
            continue
        j, k = i - 1, i + 1
        while j >= 0 and words[j] in _FILLER:
            j -= 1
        while k < len(words) and words[k] in _FILLER:
            k += 1
        if j >= 0 and k < len(words) and words[j] != words[k]:
            pairs.add((words[j], words[k]))
    return frozenset(pairs)


def _code_like(tok: str) -> bool:
    """snake_case, camelCase, dotted.name, call(), --flag, /path, email, URL."""
    if "_" in tok or "@" in tok or "://" in tok or tok.endswith("()"):
        return any(c.isalpha() for c in tok)
    if tok[0] == "-":
        return len(tok) > 1 and tok.lstrip("-")[:1].isalpha()
    if tok[0] == "/" or tok.startswith(("~/", "./", "../")):
        return len(tok) > 2
    if "." in tok:
        parts = tok.split(".")
        return all(p[:1].isalpha() or p[:1] == "_" for p in parts) and tok.lower() not in _NOT_CODE
    return tok[0].islower() and not tok.islower() and tok[1:].isalnum()  # camelCase, iPhone


def _names(original: str) -> set[str]:
    names: set[str] = set()
    if '"' in original or "`" in original or " '" in original or original.startswith("'"):
        for m in _QUOTED.finditer(original):
            names.add((m.group(1) or m.group(2) or m.group(3)).strip().lower())
    for line in original.splitlines():
        at_start = True
        for raw in line.split():
            if raw.isalpha() and raw.islower():  # the common case: a plain lower-case word
                at_start = False
                continue
            starts_sentence, at_start = at_start, raw.rstrip(_CLOSERS)[-1:] in (".", "!", "?", ":", ";")
            tok = raw.strip(_EDGE).rstrip(".")
            if tok.startswith("(") or (tok.endswith(")") and not tok.endswith("()")):
                tok = tok.strip("()")
            if not tok:
                continue
            low = tok.lower()
            if low in _SPECIAL_NAMES or low == "www" or _code_like(tok):
                names.add(low)
                continue
            if not (tok[0].isupper() or tok[0].isdigit()):
                continue
            uppers = sum(c.isupper() for c in tok)
            if tok[0].isdigit() and not uppers:
                continue  # a number: the number check owns it
            is_acronym = uppers >= 2 or any(c.isdigit() for c in tok)
            if starts_sentence and not is_acronym:
                continue  # an ordinary capital at a sentence start
            low = low.removesuffix("'s")
            if low not in _NOT_NAMES:
                names.add(low)
    return names


@lru_cache(maxsize=8192)
def features(text: str) -> Features:
    """The guard's view of `text` (memoised; pure)."""
    original = text if text.isascii() else text.translate(_APOS)
    if "cent" in original:
        original = _PERCENT.sub("%", original)
    low = original.lower()
    words = _WORD.findall(low)
    negations = sum(1 for w in words if w in NEGATIONS or w.endswith("n't"))
    names = _names(original)
    names.update(w for w in words if w in KNOWN_NAMES)
    names.update(w for i, w in enumerate(words) if w in _CONTEXT_NAMES and i and words[i - 1] in _PREPOSITIONS)
    word_set = frozenset(words)
    prefixed = frozenset(
        (w[len(p):], p) for w in word_set for p in _PREFIXES if w.startswith(p) and len(w) - len(p) >= 4)
    text = " ".join(words)
    position = {w: i for i, w in reversed(list(enumerate(words)))}
    order = tuple(sorted(names, key=lambda n: (position.get(n, len(words)), text.find(n), n)))
    return Features(frozenset(_numbers(original, words)), negations, frozenset(_sides(words)),
                    _arrows(words), word_set, prefixed, frozenset(names), order, text)


def _missing_name(names: frozenset[str], other: Features) -> str | None:
    for name in sorted(names):
        if name.isalnum():
            if name not in other.words:
                return name
        elif name not in other.names:
            bare = " ".join(_WORD.findall(name))  # without punctuation: "Node.js" ~ "node js"
            if len(bare) < 3 or f" {bare} " not in f" {other.text} ":
                return name
    return None


def _conflict(a: Features, b: Features) -> str | None:
    """A group where the texts take different sides (both present), as 'word vs word'."""
    sa = {(g, s) for g, s, _ in a.sides}
    sb = {(g, s) for g, s, _ in b.sides}
    groups_a = {g for g, _ in sa}
    for g in sorted(groups_a & {g for g, _ in sb}):
        if {s for h, s in sa if h == g} != {s for h, s in sb if h == g}:
            wa = sorted(w for h, _, w in a.sides if h == g)
            wb = sorted(w for h, _, w in b.sides if h == g)
            return f"{'/'.join(wa)} vs {'/'.join(wb)}"
    return None


def _negated_form(a: Features, b: Features) -> str | None:
    """`lock` in one text, `unlock` in the other (and not in the first)."""
    for x, y in ((a, b), (b, a)):
        for stem, p in sorted(y.prefixed):
            if stem in x.words and stem not in y.words and p + stem not in x.words:
                return f"{stem} vs {p + stem}"
    return None


def guard(query: str, cached: str) -> str | None:
    """Why `cached`'s answer must not be served for `query` (a short reason), or None if nothing differs."""
    if query == cached:
        return None
    a, b = features(query), features(cached)
    if a.numbers != b.numbers:
        only_a, only_b = sorted(a.numbers - b.numbers), sorted(b.numbers - a.numbers)
        return f"numbers differ: {', '.join(only_a) or '-'} vs {', '.join(only_b) or '-'}"
    if a.negations != b.negations:
        return f"negation differs: {a.negations} vs {b.negations} cue(s)"
    conflict = _conflict(a, b) or _negated_form(a, b)
    if conflict is not None:
        return f"opposite meaning: {conflict}"
    for x, y in sorted(a.arrows):
        if (y, x) in b.arrows and (x, y) not in b.arrows:
            return f"opposite direction: {x} to {y} vs {y} to {x}"
    shared_a = [n for n in a.order if n in b.names]
    shared_b = [n for n in b.order if n in a.names]
    if len(shared_a) >= 2 and shared_a != shared_b:
        return f"names in another order: {', '.join(shared_a)} vs {', '.join(shared_b)}"
    missing = _missing_name(a.names, b)
    if missing is not None:
        return f"entity differs: {missing!r} only in the query"
    missing = _missing_name(b.names, a)
    if missing is not None:
        return f"entity differs: {missing!r} only in the cached prompt"
    return None
