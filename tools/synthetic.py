"""A seeded generator of a fictional multi-hop QA world: corpus, questions, oracle trajectories.

It is how the project runs offline and how the trainer is tested: a tiny model learns the action format by SFT on
the oracle trajectories, then is RL-trained on the questions, with the corpus behind the search tool.

The world. ``size`` *core* entities (people, cities, countries, organisations, works) linked by relations
(person born_in city, city in country, country capital city, org founded_by person, org headquartered_in city,
work created_by person, work published_by org, person member_of org), plus about twice as many *distractor*
entities whose names share a word with a core name ("Varo Tessin" / "Dalen Tessin", "Kelmar Press" / "Kelmar
Books", "Orlan Tides" / "Orlan Embers") and whose passages use the same templates. One passage per entity.

Contract (what always holds; ``tests/test_synthetic.py`` checks it):

- Deterministic: the world is a function of ``(seed, size, heldout_frac, GENERATOR_VERSION)`` only; files written
  are byte-identical across runs and processes (one ``random.Random(seed)``, no ``hash()``, no set iteration).
- Names are unique over all entities (case-insensitive), made of one or two short invented words (two
  syllables, 4-6 letters) or an invented word plus a fixed English type word. No invented word is a template
  word or a stopword, and no two invented words could stem alike, so a name's words occur only in passages that
  mention that name. Why short: a ByteLevel BPE with a 2,048 vocabulary trained on `world_texts` makes each name
  word one token (names are 1-2 tokens, which a tiny model copies reliably); with 1,024 names average ~3.6 tokens.
- A passage's text starts with its entity's title and states that entity's attributes and its *outgoing*
  relations only (a person's passage names their birth city, never the organisations they founded). So the
  passage that answers a bridge question never names the question's first-hop entity, and the hops are needed.
- Every question's oracle is ``hops`` searches followed by exactly one answer; each search query is the exact
  title of the passage it must read (``supporting_ids``, in order). Distractors are never in ``supporting_ids``.
- The canonical answer appears verbatim in the last supporting passage (single and bridge questions), or is
  the title of one of the two supporting passages (comparison questions, whose oracle searches the two
  entities in the order the question names them, so the order does not give the answer away).
- No single or bridge answer appears in its own question text. Comparison questions never tie.
- Splits are disjoint in question text (hence in (template, entities)) and stratified by (kind, hops). All
  splits share one corpus (every passage, so search works for every split). By default (``heldout_frac=0``) they
  also share one set of entities: dev/test questions are *new questions* (other facts and other compositions of
  hops) about the same world, not questions about unseen entities. That is the usual held-out setting of
  multi-hop QA over a fixed corpus; unseen entities are what a tiny model fails on for the wrong reason
  (miscopied names: 83.5% vs 13.5% success in the DESIGN appendix's feasibility run).
- Held-out entities (``heldout_frac > 0``, issue 12: dev EM must measure searching, hopping and copying names,
  not memorised facts). ``round(heldout_frac * n)`` of the ``n`` core people, of the organisations and of the
  works are held out (``_HELDOUT_KINDS`` says why not cities or countries), drawn with the world's rng after the
  passages, so the corpus is byte for byte the one ``heldout_frac=0`` gives. No train question involves a
  held-out entity: none is searched (so no held-out passage is in its ``supporting_ids``), named in its text, or
  its answer. Every dev/test question's first hop is a held-out entity (a comparison's two entities both are), so
  the fact it reads there is stated only in a passage that no train oracle reads (passages state outgoing
  relations only); its later hops may be seen entities. Dev and test share the held-out set. A passage a train
  question reads may still name a held-out entity in passing (a seen organisation founded by a held-out person),
  never a fact that a dev/test question asks about it. Questions whose first hop is seen but which involve a
  held-out entity later are in no split. The manifest records ``heldout_frac`` and ``heldout_ids`` (passage ids).

Not guaranteed by construction but measured by the tests with the project's BM25 index: each oracle query
retrieves its passage at rank 1 (100% for seeds 0-4 at size 300, and at sizes 40-1000), and searching a bridge
question's raw text puts the answer passage in the top 3 for under 1% of them at size 300 (a few % at size
40-100; the leaks are "capital of the country where ..." questions hitting a country passage by its generic
words). Comparison questions are the exception by nature: their text names both entities, so one search of it
returns both passages (~99%).

Sizes at the default ``size=300``: 300 core + ~640 distractor passages, 1,500 train / 200 dev / 200 test
questions (about 25% single, 35% 2-hop bridge, 25% 3-hop bridge, 15% comparison); generated in well under a
second. ``MIN_SIZE`` = 40. With ``heldout_frac=0.3``: 73 held-out entities (32 people, 18 organisations, 23
works); dev and test keep 200 questions each with the same mix (50/70/50/30); train keeps its 375 single and 225
comparison questions but has only 449-522 of the 525 2-hop and 292-336 of the 375 3-hop bridges it would take
(seeds 0-4), 1,341-1,458 in all: a stratum short of candidates gives what it has and is never topped up from
another, so the mix stays honest. At size 40 it is 27/27 dev/test and ~180 train. A ``heldout_frac`` that leaves
some split without some (kind, hops) is a ValueError.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

GENERATOR_VERSION = 1
"""Bump whenever the output for a given (seed, size, heldout_frac) changes: it names the cache directory."""

# ---------------------------------------------------------------------------------------------------------------
# Public types


@dataclass(frozen=True)
class Passage:
    id: str  # "p000123"
    title: str
    text: str  # starts with the title

    @property
    def contents(self) -> str:
        """FlashRAG corpus format: the quoted title, a newline, the text."""
        return '"' + self.title + '"\n' + self.text


@dataclass(frozen=True)
class OracleStep:
    kind: Literal["search", "answer"]
    text: str  # the query, or the answer


@dataclass(frozen=True)
class Question:
    id: str  # "train-000012"
    question: str
    golden_answers: list[str]  # first is canonical
    hops: int  # 1, 2 or 3: number of searches the oracle makes
    kind: str  # "single" | "bridge" | "comparison"
    oracle: list[OracleStep]  # `hops` searches, then exactly one answer
    supporting_ids: list[str]  # passage ids the oracle reads, in order (one per search)


@dataclass
class World:
    seed: int
    size: int
    passages: list[Passage]  # sorted by id
    splits: dict[str, list[Question]]  # "train", "dev", "test"
    heldout_frac: float = 0.0  # share of core people, organisations and works held out of train (0: none)
    heldout_ids: list[str] = field(default_factory=list)  # passage ids of the held-out entities, sorted


SPLITS = ("train", "dev", "test")
MIN_SIZE = 40
"""Smallest `size` accepted: enough entities for every kind of question in every split."""

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary. Every fixed word below is "reserved": invented names never collide with it, so a name's words occur
# only in passages that mention that name.

_OCCUPATIONS_BY_WORK = {
    "book": ["writer", "poet", "novelist"],
    "film": ["director", "filmmaker"],
    "album": ["composer", "singer", "musician"],
}
_OTHER_OCCUPATIONS = ["painter", "architect", "engineer", "physician", "merchant", "sculptor", "chemist", "lawyer"]
_GENRES = {
    "book": ["mystery", "fantasy", "romance", "satire", "historical"],
    "film": ["drama", "comedy", "thriller", "western", "documentary"],
    "album": ["jazz", "folk", "rock", "ambient", "orchestral"],
}
_WORK_NOUNS = [
    "Tides", "Lanterns", "Embers", "Harbor", "Orchard", "Meridian", "Hollow", "Sparrows",
    "Winter", "Mirrors", "Ashes", "Voyage", "Thunder", "Gardens", "Shadows", "Silence",
]  # fmt: skip
# org kind -> (type words used in names, description used in the passage)
_ORG_KINDS = {
    "publisher": (["Press", "Books", "Editions"], "publishing house"),
    "studio": (["Studios", "Pictures", "Cinema"], "film studio"),
    "label": (["Records", "Sound", "Music"], "record label"),
    "society": (["Society", "Guild", "Circle"], "learned society"),
}
_PUBLISHER_KIND = {"book": "publisher", "film": "studio", "album": "label"}
_WORK_WORD = {"book": "novel", "film": "film", "album": "album"}
_CREATOR_ROLE = {"book": "author", "film": "director", "album": "artist"}
_CREATE_VERB = {"book": "wrote", "film": "directed", "album": "recorded"}
_PUBLISHER_PHRASE = {"book": "publisher of", "film": "studio that produced", "album": "label that released"}
_PUBLISH_Q = {"book": "Which company published", "film": "Which studio produced", "album": "Which label released"}
_RELEASE_VERB = {"book": "published", "film": "released", "album": "released"}
_TRAITS = [
    "a patient manner", "long letters", "bold ideas", "careful work", "a sharp wit", "generous teaching",
    "late hours", "a love of maps", "quiet charm", "a famous temper", "strict habits", "a large library",
]  # fmt: skip
_CITY_FEATURES = [
    "old bridges", "a busy harbour", "its markets", "a stone cathedral", "narrow streets", "its gardens",
    "a salt lake", "its festivals", "a clock tower", "its mills", "a hill fortress", "its canals",
]  # fmt: skip
_GEO = [
    "on the northern coast", "in the eastern highlands", "on a southern peninsula", "in the western plains",
    "between two rivers", "on a chain of islands", "in a mountain basin", "along a great lake",
]  # fmt: skip

# Templates; {placeholders} are filled with names/values. Kept in one place so _RESERVED sees every word.
_PERSON_OPEN = [
    "{name} was a {occ} born in {city} in {year}.",
    "{name} was born in {year} in {city} and worked as a {occ}.",
]
_PERSON_MOVED = "{sur} later moved to {city}."
_PERSON_MEMBER = "{sur} was a member of {org}."
_PERSON_TRAIT = "{sur} was known for {trait}."
_CITY_TEXT = [
    "{name} is a city in {country}. {name} was founded in {year} and has about {pop} inhabitants. "
    "{name} is known for {feat}.",
    "{name} is a city in {country}, founded in {year}. Today {name} has about {pop} inhabitants "
    "and is known for {feat}.",
]
_COUNTRY_TEXT = "{name} is a country {geo}. Its capital is {capital}, and {name} has about {pop} million people."
_ORG_TEXT = [
    "{name} is a {desc} founded in {year} by {founder}. {name} is headquartered in {city}.",
    "{name} is a {desc} headquartered in {city}. {name} was founded by {founder} in {year}.",
]
_WORK_TEXT = {
    "book": "{name} is {genre} novel written by {creator}. {name} was published in {year} by {pub}.",
    "film": "{name} is {genre} film directed by {creator}. {name} was released in {year} and produced by {pub}.",
    "album": "{name} is {genre} album recorded by {creator}. {name} was released in {year} by {pub}.",
}
_QUESTION_WORDS = (
    "In what year was born which city country did the founder of organisation that belonged to is "
    "headquartered located what capital who founded genre published released first earlier later occupation "
    "where founded wrote directed recorded author artist label studio producer produced company publisher"
)


# Lucene's English stopwords (tantivy's list): a name word must never be dropped from a query as a stopword.
_STOPWORDS = (
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they "
    "this to was will with"
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


_WORD_RE = re.compile(r"\w+")


def _mentions(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words, ignoring case and punctuation ("1,200" = "1 200")."""
    return f" {' '.join(_WORD_RE.findall(phrase.lower()))} " in f" {' '.join(_WORD_RE.findall(text.lower()))} "


def _reserved_words() -> set[str]:
    texts: list[str] = [_STOPWORDS, _QUESTION_WORDS, *_OTHER_OCCUPATIONS, *_WORK_NOUNS, *_TRAITS, *_CITY_FEATURES]
    texts += _GEO
    texts += [*_PERSON_OPEN, _PERSON_MOVED, _PERSON_MEMBER, _PERSON_TRAIT, *_CITY_TEXT, _COUNTRY_TEXT, *_ORG_TEXT]
    texts += list(_WORK_TEXT.values()) + list(_WORK_WORD.values()) + list(_CREATOR_ROLE.values())
    texts += list(_CREATE_VERB.values()) + list(_PUBLISHER_PHRASE.values()) + list(_PUBLISH_Q.values())
    for group in (_OCCUPATIONS_BY_WORK, _GENRES):
        for values in group.values():
            texts += values
    for type_words, desc in _ORG_KINDS.values():
        texts += [*type_words, desc]
    out: set[str] = set()
    for text in texts:
        out.update(_words(text))
    return out


_RESERVED = _reserved_words()

# Syllables: onset + vowel + optional coda. Two syllables make a word ("Va"+"ro", "Tes"+"sin", "Kel"+"mar"):
# short enough that a BPE vocabulary trained on the world turns each word into one or two tokens.
_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
_CODAS = ["", "", "", "n", "r", "l", "s"]
_FINAL_CODAS = ["", "", "", "n", "r", "l"]  # no final "s": "Marvas" would stem to "Marva"


def _stem_key(word: str) -> str:
    """A conservative stand-in for the retriever's English stemmer, which may drop a final "e" or "li" ("Marle" ->
    "marl", "Marli" -> "mar"): words with one key might stem alike, so a word whose key is taken is rejected."""
    return word.lower().rstrip("aeiou")


class _Namer:
    """Hands out unique invented words: never a stem key of a reserved word or of a word handed out before."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used_keys: set[str] = {_stem_key(w) for w in _RESERVED}

    def word(self) -> str:
        rng = self.rng
        for _ in range(10_000):
            first = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            # After a coda, the second onset is a single consonant, so clusters stay pronounceable.
            onsets = _ONSETS if first[-1] in "aeiou" else _ONSETS[:15]
            second = rng.choice(onsets) + rng.choice(_VOWELS) + rng.choice(_FINAL_CODAS)
            word = (first + second).capitalize()
            if 4 <= len(word) <= 6 and _stem_key(word) not in self.used_keys:
                self.used_keys.add(_stem_key(word))
                return word
        raise RuntimeError("name space exhausted; the syllable inventory is too small for this size")


# ---------------------------------------------------------------------------------------------------------------
# Entities (internal). Relations are object references; `core` entities link only to core entities, so every
# oracle path stays inside the core; distractors may point anywhere.


@dataclass(eq=False)
class _Country:
    name: str
    pop: int  # millions
    geo: str
    capital: _City | None = None
    core: bool = True
    pid: str = ""


@dataclass(eq=False)
class _City:
    name: str
    country: _Country
    year: int
    pop: int
    feat: str
    core: bool
    pid: str = ""


@dataclass(eq=False)
class _Person:
    name: str
    surname: str
    occ: str
    year: int
    city: _City
    core: bool
    moved: _City | None = None
    member: _Org | None = None
    trait: str = ""
    pid: str = ""


@dataclass(eq=False)
class _Org:
    name: str
    stem: str
    kind: str  # key of _ORG_KINDS
    year: int
    founder: _Person
    hq: _City
    core: bool
    variant: int = 0
    pid: str = ""


@dataclass(eq=False)
class _Work:
    name: str
    stem: str
    kind: str  # "book" | "film" | "album"
    genre: str
    year: int
    creator: _Person
    publisher: _Org
    core: bool
    pid: str = ""


_Entity = _Country | _City | _Person | _Org | _Work
_Dated = _City | _Person | _Org | _Work  # entities with a `year`, which comparison questions compare


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fmt_pop(n: int) -> str:
    return f"{n:,}"


def _person_text(p: _Person, variant: int) -> str:
    parts = [_PERSON_OPEN[variant].format(name=p.name, occ=p.occ, city=p.city.name, year=p.year)]
    if p.moved is not None:
        parts.append(_PERSON_MOVED.format(sur=p.surname, city=p.moved.name))
    if p.member is not None:
        parts.append(_PERSON_MEMBER.format(sur=p.surname, org=p.member.name))
    parts.append(_PERSON_TRAIT.format(sur=p.surname, trait=p.trait))
    return " ".join(parts)


def _passage_text(e: _Entity, variant: int) -> str:
    if isinstance(e, _Person):
        return _person_text(e, variant)
    if isinstance(e, _City):
        tpl = _CITY_TEXT[variant]
        return tpl.format(name=e.name, country=e.country.name, year=e.year, pop=_fmt_pop(e.pop), feat=e.feat)
    if isinstance(e, _Country):
        assert e.capital is not None, e.name
        return _COUNTRY_TEXT.format(name=e.name, geo=e.geo, capital=e.capital.name, pop=e.pop)
    if isinstance(e, _Org):
        desc = _ORG_KINDS[e.kind][1]
        return _ORG_TEXT[variant].format(name=e.name, desc=desc, year=e.year, founder=e.founder.name, city=e.hq.name)
    tpl = _WORK_TEXT[e.kind]
    return tpl.format(name=e.name, genre=_a(e.genre), creator=e.creator.name, year=e.year, pub=e.publisher.name)


# ---------------------------------------------------------------------------------------------------------------
# Building the entity graph


@dataclass
class _Graph:
    countries: list[_Country]
    cities: list[_City]
    persons: list[_Person]
    orgs: list[_Org]
    works: list[_Work]

    def all(self) -> list[_Entity]:
        return [*self.countries, *self.cities, *self.persons, *self.orgs, *self.works]


def _core_counts(size: int) -> dict[str, int]:
    countries = max(3, round(size * 0.04))
    cities = max(6, round(size * 0.15))
    orgs = max(8, round(size * 0.20))
    works = max(6, round(size * 0.26))
    persons = size - countries - cities - orgs - works
    assert persons >= 8, (size, persons)
    return {"country": countries, "city": cities, "org": orgs, "work": works, "person": persons}


# Distractors per core entity of each kind (countries get none): ~2.1x the core in all, a ~1k corpus at size 300.
_DISTRACTORS_PER_CORE = {"city": 1.0, "person": 3.0, "org": 2.0, "work": 2.0}


def _attempts(have: int, target: int, count: Callable[[], int]) -> Iterator[None]:
    """Yields until `count()` reaches `target`; fails loudly instead of looping forever on an exhausted name space."""
    for _ in range(100 * (target - have) + 100):
        if count() >= target:
            return
        yield
    raise RuntimeError(f"could not make {target} distinct names (have {count()}); the name space is exhausted")


def _build_graph(rng: random.Random, size: int) -> _Graph:
    n = _core_counts(size)
    namer = _Namer(rng)

    countries = [_Country(namer.word(), rng.randint(2, 60), rng.choice(_GEO)) for _ in range(n["country"])]

    def new_city(country: _Country, core: bool) -> _City:
        pop = rng.randint(8, 900) * 1000
        return _City(namer.word(), country, rng.randint(800, 1750), pop, rng.choice(_CITY_FEATURES), core)

    cities = [
        new_city(countries[i % len(countries)] if i < len(countries) else rng.choice(countries), True)
        for i in range(n["city"])
    ]
    for country, city in zip(countries, cities, strict=False):  # each country's first city is its capital
        country.capital = city
    cities += [new_city(rng.choice(countries), False) for _ in range(round(n["city"] * _DISTRACTORS_PER_CORE["city"]))]
    core_cities = cities[: n["city"]]

    # People: a shared pool of given names, a unique surname per core person; distractor people recombine a core
    # surname with another given name (or a core given name with another core surname), so they add no new words.
    n_dist_persons = round(n["person"] * _DISTRACTORS_PER_CORE["person"])
    givens = [namer.word() for _ in range(max(6, (n["person"] + n_dist_persons) // 8))]
    creator_occs = [occ for occs in _OCCUPATIONS_BY_WORK.values() for occ in occs]
    all_occs = creator_occs + _OTHER_OCCUPATIONS
    taken: set[str] = set()
    persons: list[_Person] = []

    def new_person(given: str, surname: str, core: bool, occ: str, city_pool: list[_City]) -> _Person:
        name = f"{given} {surname}"
        taken.add(name.lower())
        moved = rng.choice(city_pool) if rng.random() < 0.35 else None
        city = rng.choice(city_pool)
        if moved is city:
            moved = None
        return _Person(name, surname, occ, rng.randint(1780, 1950), city, core, moved, None, rng.choice(_TRAITS))

    for i in range(n["person"]):
        # The first persons cover every creator group, so every work kind has candidate creators.
        occ = [occs[0] for occs in _OCCUPATIONS_BY_WORK.values()][i] if i < 3 else rng.choice(all_occs)
        persons.append(new_person(rng.choice(givens), namer.word(), True, occ, core_cities))
    core_persons = list(persons)
    for _ in _attempts(len(persons), n["person"] + n_dist_persons, lambda: len(persons)):
        twin = rng.choice(core_persons)
        if rng.random() < 0.6:
            given, surname = rng.choice(givens), twin.surname
        else:
            given, surname = twin.name.split(" ")[0], rng.choice(core_persons).surname
        if f"{given} {surname}".lower() not in taken:
            persons.append(new_person(given, surname, False, rng.choice(all_occs), cities))

    # Organisations: each kind present at least twice among the core ones.
    kinds = list(_ORG_KINDS)
    orgs: list[_Org] = []

    def new_org(stem: str, kind: str, core: bool, founders: list[_Person], hqs: list[_City]) -> _Org | None:
        type_word = rng.choice(_ORG_KINDS[kind][0])
        name = f"{stem} {type_word}"
        if name.lower() in taken:
            return None
        taken.add(name.lower())
        founder = rng.choice(founders)
        year = min(founder.year + rng.randint(22, 60), 1995)
        return _Org(name, stem, kind, year, founder, rng.choice(hqs), core, rng.randrange(len(_ORG_TEXT)))

    for i in range(n["org"]):
        org = new_org(namer.word(), kinds[i % 4] if i < 8 else rng.choice(kinds), True, core_persons, core_cities)
        assert org is not None
        orgs.append(org)
    core_orgs = list(orgs)
    target = n["org"] + round(n["org"] * _DISTRACTORS_PER_CORE["org"])
    for _ in _attempts(len(orgs), target, lambda: len(orgs)):
        twin = rng.choice(core_orgs)
        kind = twin.kind if rng.random() < 0.5 else rng.choice(kinds)
        org = new_org(twin.stem, kind, False, persons, cities)
        if org is not None:
            orgs.append(org)

    # Membership of learned societies (never of one's own foundation), for some people.
    societies = {core: [o for o in (core_orgs if core else orgs) if o.kind == "society"] for core in (True, False)}
    for p in persons:
        if rng.random() < 0.5:
            org = rng.choice(societies[p.core])
            p.member = org if org.founder is not p else None

    # Works: created by a person of the matching occupation group, published by an org of the matching kind.
    works: list[_Work] = []

    # (core?, work kind) -> eligible creators / publishers; core works draw only from core entities.
    creators = {
        (core, kind): [p for p in (core_persons if core else persons) if p.occ in occs]
        for core in (True, False)
        for kind, occs in _OCCUPATIONS_BY_WORK.items()
    }
    publishers = {
        (core, kind): [o for o in (core_orgs if core else orgs) if o.kind == org_kind]
        for core in (True, False)
        for kind, org_kind in _PUBLISHER_KIND.items()
    }

    def new_work(stem: str, kind: str, core: bool) -> _Work | None:
        name = f"{stem} {rng.choice(_WORK_NOUNS)}"
        if name.lower() in taken:
            return None
        taken.add(name.lower())
        creator = rng.choice(creators[core, kind])
        pub = rng.choice(publishers[core, kind])
        year = max(creator.year + rng.randint(20, 55), pub.year + rng.randint(0, 20))
        return _Work(name, stem, kind, rng.choice(_GENRES[kind]), year, creator, pub, core)

    work_kinds = list(_PUBLISHER_KIND)
    core_stems: list[tuple[str, str]] = []
    for i in range(n["work"]):
        stem, kind = namer.word(), work_kinds[i % 3] if i < 3 else rng.choice(work_kinds)
        work = new_work(stem, kind, True)
        assert work is not None
        works.append(work)
        core_stems.append((stem, kind))
    target = n["work"] + round(n["work"] * _DISTRACTORS_PER_CORE["work"])
    for _ in _attempts(len(works), target, lambda: len(works)):
        stem, kind = rng.choice(core_stems)
        work = new_work(stem, kind if rng.random() < 0.5 else rng.choice(work_kinds), False)
        if work is not None:
            works.append(work)

    return _Graph(countries, cities, persons, orgs, works)


# ---------------------------------------------------------------------------------------------------------------
# Questions


@dataclass
class _Cand:
    stratum: str  # "single" | "bridge2" | "bridge3" | "comparison"
    template: str  # groups candidates for balanced sampling
    question: str
    answer: str
    path: list[_Entity]  # the entities the oracle searches, in order

    @property
    def kind(self) -> str:
        return self.stratum.rstrip("23")


_STRATA = {"single": 0.25, "bridge2": 0.35, "bridge3": 0.25, "comparison": 0.15}


def _single_and_bridge(g: _Graph) -> list[_Cand]:
    out: list[_Cand] = []

    def add(template: str, question: str, answer: str, path: list[_Entity]) -> None:
        if _mentions(question, answer):
            return  # e.g. the capital of the country where the capital lies: no hops needed
        hops = len(path)
        out.append(_Cand("single" if hops == 1 else f"bridge{hops}", template, question, answer, path))

    for p in (p for p in g.persons if p.core):
        n, city, country = p.name, p.city, p.city.country
        add("p.year", f"In what year was {n} born?", str(p.year), [p])
        add("p.city", f"In which city was {n} born?", city.name, [p])
        add("p.occ", f"What was the occupation of {n}?", p.occ, [p])
        add("p.country", f"In which country was {n} born?", country.name, [p, city])
        assert country.capital is not None
        add(
            "p.capital",
            f"What is the capital of the country where {n} was born?",
            country.capital.name,
            [p, city, country],
        )
        if (org := p.member) is not None:
            what = f"the organisation that {n} was a member of"
            add("p.org.year", f"In what year was {what} founded?", str(org.year), [p, org])
            add("p.org.founder", f"Who founded {what}?", org.founder.name, [p, org])
            add(
                "p.org.founder.year",
                f"In what year was the founder of {what} born?",
                str(org.founder.year),
                [p, org, org.founder],
            )
            add("p.org.country", f"In which country is {what} headquartered?", org.hq.country.name, [p, org, org.hq])
    for c in (c for c in g.cities if c.core):
        add("c.country", f"In which country is the city of {c.name}?", c.country.name, [c])
        add("c.year", f"In what year was the city of {c.name} founded?", str(c.year), [c])
        assert c.country.capital is not None
        add(
            "c.capital",
            f"What is the capital of the country where {c.name} is located?",
            c.country.capital.name,
            [c, c.country],
        )
    for k in g.countries:
        assert k.capital is not None
        add("k.capital", f"What is the capital of {k.name}?", k.capital.name, [k])
    for o in (o for o in g.orgs if o.core):
        n, f, hq = o.name, o.founder, o.hq
        add("o.year", f"In what year was {n} founded?", str(o.year), [o])
        add("o.founder", f"Who founded {n}?", f.name, [o])
        add("o.hq", f"In which city is {n} headquartered?", hq.name, [o])
        add("o.f.year", f"In what year was the founder of {n} born?", str(f.year), [o, f])
        add("o.f.city", f"In which city was the founder of {n} born?", f.city.name, [o, f])
        add("o.f.occ", f"What was the occupation of the founder of {n}?", f.occ, [o, f])
        add("o.hq.country", f"In which country is {n} headquartered?", hq.country.name, [o, hq])
        add("o.hq.year", f"In what year was the city where {n} is headquartered founded?", str(hq.year), [o, hq])
        add("o.f.country", f"In which country was the founder of {n} born?", f.city.country.name, [o, f, f.city])
        assert hq.country.capital is not None
        add(
            "o.hq.capital",
            f"What is the capital of the country where {n} is headquartered?",
            hq.country.capital.name,
            [o, hq, hq.country],
        )
    for w in (w for w in g.works if w.core):
        n, c, pub = w.name, w.creator, w.publisher
        role, pub_of = _CREATOR_ROLE[w.kind], _PUBLISHER_PHRASE[w.kind]
        add("w.year", f"In what year was {n} {_RELEASE_VERB[w.kind]}?", str(w.year), [w])
        add("w.creator", f"Who {_CREATE_VERB[w.kind]} {n}?", c.name, [w])
        add("w.pub", f"{_PUBLISH_Q[w.kind]} {n}?", pub.name, [w])
        add("w.genre", f"What genre is {n}?", w.genre, [w])
        add("w.c.year", f"In what year was the {role} of {n} born?", str(c.year), [w, c])
        add("w.c.city", f"In which city was the {role} of {n} born?", c.city.name, [w, c])
        add("w.pub.year", f"In what year was the {pub_of} {n} founded?", str(pub.year), [w, pub])
        add("w.pub.founder", f"Who founded the {pub_of} {n}?", pub.founder.name, [w, pub])
        add("w.pub.hq", f"In which city is the {pub_of} {n} headquartered?", pub.hq.name, [w, pub])
        add("w.c.country", f"In which country was the {role} of {n} born?", c.city.country.name, [w, c, c.city])
        add(
            "w.pub.f.year",
            f"In what year was the founder of the {pub_of} {n} born?",
            str(pub.founder.year),
            [w, pub, pub.founder],
        )
        add(
            "w.pub.f.city",
            f"In which city was the founder of the {pub_of} {n} born?",
            pub.founder.city.name,
            [w, pub, pub.founder],
        )
        add(
            "w.pub.country",
            f"In which country is the {pub_of} {n} headquartered?",
            pub.hq.country.name,
            [w, pub, pub.hq],
        )
    return out


def _comparisons(g: _Graph, rng: random.Random, per_template: int) -> list[_Cand]:
    """Up to `per_template` candidates per comparison template, distinct unordered pairs, never a tie."""
    # (template, entities compared, question opening, word for the smaller year, word for the larger year)
    groups: list[tuple[str, list[_Dated], str, str, str]] = [
        ("cmp.person", [p for p in g.persons if p.core], "Who was born", "earlier", "later"),
        ("cmp.org", [o for o in g.orgs if o.core], "Which was founded", "first", "later"),
        ("cmp.city", [c for c in g.cities if c.core], "Which city was founded", "first", "later"),
    ]
    for kind, verb in _RELEASE_VERB.items():
        works: list[_Dated] = [w for w in g.works if w.core and w.kind == kind]
        groups.append((f"cmp.{kind}", works, f"Which was {verb}", "first", "later"))
    out: list[_Cand] = []
    for template, pool, opening, early_word, late_word in groups:
        seen: set[tuple[str, str]] = set()
        for _ in range(per_template * 4):
            if len(seen) >= per_template or len(pool) < 2:
                break
            a, b = rng.sample(pool, 2)
            key = (a.name, b.name) if a.name < b.name else (b.name, a.name)
            if a.year == b.year or key in seen:
                continue
            seen.add(key)
            early = rng.random() < 0.6
            answer = a if (a.year < b.year) == early else b
            question = f"{opening} {early_word if early else late_word}, {a.name} or {b.name}?"
            out.append(_Cand("comparison", template, question, answer.name, [a, b]))
    return out


def _balanced_take(cands: list[_Cand], k: int, rng: random.Random) -> list[_Cand]:
    """`k` candidates, round-robin over templates (each template's order shuffled), then shuffled."""
    by_template: dict[str, list[_Cand]] = {}
    for c in cands:
        by_template.setdefault(c.template, []).append(c)
    queues = list(by_template.values())
    for q in queues:
        rng.shuffle(q)
    rng.shuffle(queues)
    taken: list[_Cand] = []
    while len(taken) < k and any(queues):
        for q in queues:
            if q and len(taken) < k:
                taken.append(q.pop())
    rng.shuffle(taken)
    return taken


def _split_sizes(size: int) -> dict[str, int]:
    held_out = max(20, round(size * 2 / 3))
    return {"train": 5 * size, "dev": held_out, "test": held_out}


def _to_question(qid: str, c: _Cand) -> Question:
    searches = [OracleStep("search", e.name) for e in c.path]
    return Question(
        id=qid,
        question=c.question,
        golden_answers=[c.answer],
        hops=len(c.path),
        kind=c.kind,
        oracle=[*searches, OracleStep("answer", c.answer)],
        supporting_ids=[e.pid for e in c.path],
    )


def _check_candidate(c: _Cand, text_of: dict[str, str]) -> None:
    assert all(e.core for e in c.path), f"oracle path leaves the core: {c.question}"
    if c.kind == "comparison":
        assert c.answer in (c.path[0].name, c.path[1].name), c.question
    else:
        assert not _mentions(c.question, c.answer), f"answer {c.answer!r} is in the question {c.question!r}"
        last = text_of[c.path[-1].pid]
        assert _mentions(last, c.answer), f"{c.answer!r} not in last passage {last!r}"


# ---------------------------------------------------------------------------------------------------------------
# Public API


def generate_world(seed: int = 0, size: int = 300, heldout_frac: float = 0.0) -> World:
    """Generates the world for (seed, size, heldout_frac); pure and deterministic. `size` = number of core entities;
    `heldout_frac` in [0, 1) = share of each held-out kind of core entity that no train question involves (see the
    module docstring; 0 gives the shared-entity world, unchanged)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size must be an int >= {MIN_SIZE} (core entities), got {size!r}")
    if isinstance(heldout_frac, bool) or not isinstance(heldout_frac, int | float) or not 0 <= heldout_frac < 1:
        raise ValueError(f"heldout_frac must be a number in [0, 1), got {heldout_frac!r}")
    rng = random.Random(seed)
    graph = _build_graph(rng, size)

    entities = graph.all()
    names = [e.name.lower() for e in entities]
    assert len(set(names)) == len(names), "entity names are not unique"
    rng.shuffle(entities)  # ids do not reveal kind or core/distractor
    passages: list[Passage] = []
    for i, e in enumerate(entities):
        e.pid = f"p{i:06d}"
        variant = e.variant if isinstance(e, _Org) else rng.randrange(2)
        passages.append(Passage(e.pid, e.name, _passage_text(e, variant)))
    text_of = {p.id: p.contents for p in passages}

    sizes = _split_sizes(size)
    per_template = max(10, sum(sizes.values()) // 10)
    heldout: list[_Entity] = []
    if heldout_frac == 0:
        pool = _single_and_bridge(graph) + _comparisons(graph, rng, per_template)
        for c in pool:
            _check_candidate(c, text_of)
        chosen_by_split = _split_shared(pool, sizes, rng)
    else:
        heldout = _pick_heldout(graph, heldout_frac, rng)
        chosen_by_split = _split_heldout(graph, heldout, sizes, per_template, rng, text_of)
        missing = [
            (s, stratum)
            for s in SPLITS
            for stratum in _STRATA
            if not any(c.stratum == stratum for c in chosen_by_split[s])
        ]
        if missing:
            raise ValueError(
                f"heldout_frac={heldout_frac} at size={size} leaves no questions of (split, stratum) {missing}; "
                "use a larger size or a heldout_frac nearer 0.3"
            )
    out: dict[str, list[Question]] = {}
    for s in SPLITS:
        cands = chosen_by_split[s]
        rng.shuffle(cands)
        out[s] = [_to_question(f"{s}-{i:06d}", c) for i, c in enumerate(cands)]
    texts = [q.question for qs in out.values() for q in qs]
    assert len(set(texts)) == len(texts), "question texts repeat"
    heldout_ids = sorted(e.pid for e in heldout)
    return World(seed, size, passages, out, heldout_frac=float(heldout_frac), heldout_ids=heldout_ids)


def _split_shared(pool: list[_Cand], sizes: dict[str, int], rng: random.Random) -> dict[str, list[_Cand]]:
    """heldout_frac = 0: each stratum's share of every split, drawn from one pool (dev, test, then train)."""
    chosen_by_split: dict[str, list[_Cand]] = {s: [] for s in SPLITS}
    for stratum, frac in _STRATA.items():
        want = {s: round(n * frac) for s, n in sizes.items()}
        chosen = _balanced_take([c for c in pool if c.stratum == stratum], sum(want.values()), rng)
        start = 0
        for s in ("dev", "test", "train"):  # held-out splits are filled first; train takes what is left
            chosen_by_split[s] += chosen[start : start + want[s]]
            start += want[s]
    return chosen_by_split


_HELDOUT_KINDS = (_Person, _Org, _Work)
"""Kinds of core entity that `heldout_frac` holds out. Not countries (12 at size 300) nor cities (45): they are the
hubs every person, organisation and work points to, and a train question involving a held-out entity is dropped,
so holding out 30% of them costs train far more than it gives dev. Measured at size 300, seeds 0-2, with cities
also held out: train would have ~230 3-hop bridge candidates instead of ~310 (375 wanted) and ~420 2-hop ones
instead of ~490 (525 wanted); dev would gain only the 3 city templates and city comparisons (countries: one more
template, k.capital, over 3-4 held-out countries)."""


def _pick_heldout(g: _Graph, frac: float, rng: random.Random) -> list[_Entity]:
    """round(frac * n) of the n core entities of each kind in `_HELDOUT_KINDS`, uniformly at random."""
    out: list[_Entity] = []
    for kind in _HELDOUT_KINDS:
        core = [e for e in g.all() if isinstance(e, kind) and e.core]
        out += rng.sample(core, round(frac * len(core)))
    return out


def _split_heldout(
    g: _Graph,
    heldout: list[_Entity],
    sizes: dict[str, int],
    per_template: int,
    rng: random.Random,
    text_of: dict[str, str],
) -> dict[str, list[_Cand]]:
    """heldout_frac > 0: dev/test draw from the questions whose first hop is held out (comparisons: both entities
    held out), train from those that involve no held-out entity (in their path or as their answer); a question that
    involves one later on is used by no split. A stratum short of candidates gives what it has (dev and test
    halving it), never filled from another stratum."""
    is_held = set(heldout)  # identity-hashed (eq=False); only tested for membership, never iterated
    by_name = {e.name: e for e in g.all() if e.core}

    def involved(c: _Cand) -> list[_Entity]:
        return [*c.path, *([by_name[c.answer]] if c.answer in by_name else [])]

    def only(keep: bool) -> _Graph:  # the graph with the held-out kinds cut to held (True) or seen (False) ones
        persons, orgs, works = ([e for e in es if (e in is_held) == keep] for es in (g.persons, g.orgs, g.works))
        return _Graph([] if keep else g.countries, [] if keep else g.cities, persons, orgs, works)

    pool = _single_and_bridge(g)
    held_pool = [c for c in pool if c.path[0] in is_held] + _comparisons(only(True), rng, per_template)
    train_pool = [c for c in pool if not any(e in is_held for e in involved(c))]
    train_pool += _comparisons(only(False), rng, per_template)
    for c in held_pool + train_pool:
        _check_candidate(c, text_of)
    chosen_by_split: dict[str, list[_Cand]] = {s: [] for s in SPLITS}
    for stratum, frac in _STRATA.items():
        want = {s: round(n * frac) for s, n in sizes.items()}
        assert want["dev"] == want["test"], want
        held = _balanced_take([c for c in held_pool if c.stratum == stratum], want["dev"] + want["test"], rng)
        n_dev = min(want["dev"], (len(held) + 1) // 2)
        chosen_by_split["dev"] += held[:n_dev]
        chosen_by_split["test"] += held[n_dev:]
        chosen_by_split["train"] += _balanced_take([c for c in train_pool if c.stratum == stratum], want["train"], rng)
    return chosen_by_split


def _question_record(q: Question) -> dict:
    return {
        "id": q.id,
        "question": q.question,
        "golden_answers": list(q.golden_answers),
        "metadata": {
            "hops": q.hops,
            "kind": q.kind,
            "oracle": [{"kind": s.kind, "text": s.text} for s in q.oracle],
            "supporting_ids": list(q.supporting_ids),
        },
    }


def _manifest(world: World) -> dict:
    counts = {"passages": len(world.passages), **{s: len(world.splits[s]) for s in SPLITS}}
    out: dict = {"generator_version": GENERATOR_VERSION, "seed": world.seed, "size": world.size, "counts": counts}
    if world.heldout_frac > 0:  # absent at 0, so the shared-entity world's files are unchanged
        out |= {"heldout_frac": world.heldout_frac, "heldout_ids": list(world.heldout_ids)}
    return out


def write_world(world: World, out_dir: Path) -> None:
    """Writes out_dir/corpus.jsonl ({"id", "contents"} per line, FlashRAG format),
    out_dir/{split}.jsonl ({"id","question","golden_answers","metadata":{"hops","kind","oracle":[{"kind","text"}],
    "supporting_ids"}}), and out_dir/manifest.json ({"generator_version", "seed", "size", "counts"}, plus
    "heldout_frac" and "heldout_ids" when heldout_frac > 0); atomically
    (written to a temporary sibling directory, then renamed). Raises FileExistsError if out_dir already exists and
    is not empty (it is left untouched)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as f:
            for p in world.passages:
                f.write(json.dumps({"id": p.id, "contents": p.contents}, ensure_ascii=False) + "\n")
        for s in SPLITS:
            with open(tmp / f"{s}.jsonl", "w", encoding="utf-8") as f:
                for q in world.splits[s]:
                    f.write(json.dumps(_question_record(q), ensure_ascii=False) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(_manifest(world), indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, out_dir)  # atomic; replaces out_dir only if it is an empty directory
        except OSError as e:
            if out_dir.exists():
                raise FileExistsError(f"{out_dir} already exists and is not empty; not overwriting it") from e
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir() -> Path:
    """$TRACE_CACHE_DIR, else ~/.cache/trace."""
    env = os.environ.get("TRACE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "trace"


def world_dir_name(seed: int, size: int, heldout_frac: float = 0.0) -> str:
    """The cache folder's name: f"synthetic-v{GENERATOR_VERSION}-s{seed}-n{size}", plus f"-h{heldout_frac}" (the
    float's shortest repr, e.g. "-h0.3") when heldout_frac > 0."""
    name = f"synthetic-v{GENERATOR_VERSION}-s{seed}-n{size}"
    return name + f"-h{float(heldout_frac)!r}" if heldout_frac > 0 else name


def load_or_build_world(
    cache_dir: Path | None = None, seed: int = 0, size: int = 300, heldout_frac: float = 0.0
) -> Path:
    """Returns a directory holding the written world; cached under cache_dir (default: $TRACE_CACHE_DIR or
    ~/.cache/trace) / `world_dir_name(seed, size, heldout_frac)`; builds only when missing. Safe when two
    processes build at once (atomic rename; the loser uses the winner's copy)."""
    out = Path(cache_dir if cache_dir is not None else default_cache_dir()) / world_dir_name(seed, size, heldout_frac)
    if (out / "manifest.json").is_file():
        return out
    try:
        write_world(generate_world(seed=seed, size=size, heldout_frac=heldout_frac), out)
    except FileExistsError:
        pass  # another process won the race; its copy is complete (it appeared by an atomic rename)
    assert (out / "manifest.json").is_file(), f"{out} exists but holds no manifest.json; delete it and retry"
    return out


def world_texts(world: World) -> Iterator[str]:
    """All text a tokenizer should be trained on: passage contents, questions, answers, oracle queries."""
    for p in world.passages:
        yield p.contents
    for s in SPLITS:
        for q in world.splits[s]:
            yield q.question
            yield from q.golden_answers
            for step in q.oracle:
                if step.kind == "search":
                    yield step.text


def read_world_texts(world_dir: Path) -> list[str]:
    """`world_texts` of a world written by `write_world`, read back from its files (same texts, same order), so
    a tokenizer can be trained on a world folder without regenerating it. Raises FileNotFoundError naming the
    missing file: a tokenizer silently trained on other text would differ from the one the run expects."""
    world_dir = Path(world_dir)
    paths = [world_dir / "corpus.jsonl", *(world_dir / f"{s}.jsonl" for s in SPLITS)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{world_dir} is not a synthetic world folder (`trace-world --out DIR`): no {missing}")
    texts: list[str] = []
    with open(paths[0], encoding="utf-8") as f:
        texts += [json.loads(line)["contents"] for line in f if line.strip()]
    for path in paths[1:]:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                q = json.loads(line)
                texts.append(q["question"])
                texts += q["golden_answers"]
                texts += [s["text"] for s in q["metadata"]["oracle"] if s["kind"] == "search"]
    return texts


@dataclass
class WorldConfig:
    """`trace-world`'s config: where to write which world."""

    out: str | None = None
    """Write the world into this folder (must not exist or be empty)."""
    cache_dir: str | None = None
    """Instead of --out: build into CACHE_DIR/synthetic-v<version>-s<seed>-n<size>[-h<heldout-frac>] unless already
    there, and print that folder (what the trainer uses)."""
    seed: int = 0
    size: int = 300
    """Core entities (>= MIN_SIZE = 40); about 5x as many questions."""
    heldout_frac: float = 0.0
    """In [0, 1). > 0: this share of the core people, organisations and works is held out of train, and every
    dev/test question starts at a held-out entity (issue 12: dev EM then measures searching and hopping, not
    memorised facts). Same corpus as at 0; at 0.3, size 300: dev/test 200 each, train ~1,400 (fewer 2-3-hop
    bridges; module docstring)."""

    def validate(self) -> WorldConfig:
        if (self.out is None) == (self.cache_dir is None):
            raise ValueError("give exactly one of --out DIR or --cache-dir DIR")
        if self.size < MIN_SIZE:
            raise ValueError(f"--size must be >= {MIN_SIZE}, got {self.size}")
        if not 0 <= self.heldout_frac < 1:
            raise ValueError(f"--heldout-frac must be in [0, 1), got {self.heldout_frac}")
        if self.cache_dir is not None and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise ValueError(f"--cache-dir {self.cache_dir} is a file: give a folder")
        return self


def main(argv: list[str] | None = None) -> int:
    """`trace-world`: write a synthetic world (corpus.jsonl, train/dev/test.jsonl, manifest.json) that
    `trace-env serve --data synthetic=DIR --corpus DIR/corpus.jsonl` serves."""
    import sys

    from shared.config import parse_config

    try:
        cfg = parse_config(WorldConfig, argv, prog="trace-world", description=main.__doc__ or "")
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if cfg.cache_dir is not None:
            print(load_or_build_world(Path(cfg.cache_dir), seed=cfg.seed, size=cfg.size, heldout_frac=cfg.heldout_frac))
            return 0
        assert cfg.out is not None
        world = generate_world(seed=cfg.seed, size=cfg.size, heldout_frac=cfg.heldout_frac)
        write_world(world, Path(cfg.out))
    except (ValueError, FileExistsError) as e:
        print(f"trace-world: {e}", file=sys.stderr)
        return 2
    counts = {k: len(v) for k, v in world.splits.items()}
    print(f"wrote {len(world.passages)} passages and questions {counts} to {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
