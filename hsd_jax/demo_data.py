"""A small data-to-text task that ships with the package, for the offline demo.

Each example describes an invented restaurant. The source is a compact meaning
representation of a record, in the style of the E2E challenge:

    name[The Golden Fork] type[pub] food[Italian] area[riverside] price[cheap] family[yes]

and the target is one or two English sentences that mention every field present:

    The Golden Fork is an Italian pub in the riverside. It has cheap prices and is kid friendly.

`name` and `type` are in every record; food, area, price, rating, family and near
are optional (at least `MIN_OPTIONAL` of them), so sources vary in length. A record
is rendered by one of `TEMPLATES` (sentence patterns: a description, a relative
clause, an apposition, a question ...), with the optional fields in a random order
and each said in one of a few phrasings. The wording is consistent enough for a
small model trained from scratch to learn in minutes, and varied enough that ROUGE
separates a good model from a degraded one: a source has several valid targets.

`make_splits` draws distinct records: the dev records' sources never occur in
training; each training record gives a few pairs (different templates), each dev
record several references (all from different templates). `write_splits` writes
`train.jsonl` and `dev.jsonl` ({"source", "target"} lines, one line per reference
in dev), the files `hsd_jax.data.read_pairs` reads. Everything is a pure function of
the seed: the randomness comes from `random.Random(seed)` only.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from pathlib import Path
from typing import Callable

from hsd_jax.errors import HsdError

Record = dict[str, str]  # field -> value, in FIELDS order
Pair = tuple[str, str]

TRAIN_FILE, DEV_FILE = "train.jsonl", "dev.jsonl"

# ---------------------------------------------------------------- the records

NAME_FIRST = ("Golden", "Blue", "Silver", "Crimson", "Wandering")
NAME_SECOND = ("Fork", "Lantern", "Anchor", "Olive", "Dragon", "Swan", "Spoon", "Kettle")
NAMES = tuple(f"The {first} {second}" for first in NAME_FIRST for second in NAME_SECOND)  # 40

VALUES: dict[str, tuple[str, ...]] = {
    "type": ("restaurant", "coffee shop", "pub"),
    "food": ("Italian", "Chinese", "Indian", "French", "Japanese", "English", "fast food", "Thai",
             "Mexican", "Greek", "Spanish", "seafood"),
    "area": ("city centre", "riverside", "old town", "harbour", "university district"),
    "price": ("cheap", "low", "moderate", "high"),
    "rating": ("low", "average", "high", "excellent", "1 out of 5", "3 out of 5", "5 out of 5"),
    "family": ("yes", "no"),
    "near": ("the Cathedral", "the Railway Station", "the Town Hall", "the Old Bridge", "the Museum of Art",
             "the Botanic Garden", "the Market Hall", "Victoria Park"),
}
REQUIRED = ("name", "type")
OPTIONAL = ("food", "area", "price", "rating", "family", "near")
FIELDS = REQUIRED + OPTIONAL  # the order of fields in a source
MIN_OPTIONAL = 2
OPTIONAL_PROBABILITY = 0.6  # each optional field's chance to be in a record


def random_record(rng: random.Random) -> Record:
    """A record with a name, a type and at least MIN_OPTIONAL optional fields."""
    present: list[str] = []
    while len(present) < MIN_OPTIONAL:
        present = [f for f in OPTIONAL if rng.random() < OPTIONAL_PROBABILITY]
    record = {"name": rng.choice(NAMES)}
    for field in FIELDS[1:]:
        if field in REQUIRED or field in present:
            record[field] = rng.choice(VALUES[field])
    return record


def format_record(record: Record) -> str:
    """The source string: `field[value]` for each field present, in FIELDS order."""
    return " ".join(f"{field}[{record[field]}]" for field in FIELDS if field in record)


def parse_record(source: str) -> Record:
    """The record a source string describes (the inverse of `format_record`)."""
    record = dict(re.findall(r"(\w+)\[([^\]]*)\]", source))
    if not record or any(field not in FIELDS for field in record):
        raise HsdError(f"not a demo meaning representation: {source!r}")
    return record


# ---------------------------------------------------------------- phrases


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def food_noun(food: str) -> str:
    """What a place serves: "Italian food", but "fast food" and "seafood" as they are."""
    return food if food.endswith("food") else f"{food} food"


def join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


FAMILY_PREDICATES = {
    "yes": ("is family friendly", "is kid friendly", "welcomes children"),
    "no": ("is not family friendly", "is not kid friendly", "does not welcome children"),
}


def predicate(field: str, value: str, rng: random.Random) -> str:
    """A verb phrase saying the field, for the subject "it" or the name."""
    choices = {
        "type": (f"is {with_article(value)}",),
        "food": (f"serves {food_noun(value)}", f"offers {food_noun(value)}"),
        "area": (f"is in the {value}", f"is located in the {value}"),
        "near": (f"is near {value}", f"is close to {value}"),
        "price": (f"has {value} prices", f"is in the {value} price range"),
        "rating": (f"has {with_article(value)} customer rating", f"is rated {value} by customers"),
        "family": FAMILY_PREDICATES.get(value, ()),
    }[field]
    return rng.choice(choices)


def with_phrase(field: str, value: str) -> str:
    """A noun phrase for "with ...": only price and rating have one."""
    return {"price": f"{value} prices", "rating": f"{with_article(value)} customer rating"}[field]


def location(record: Record, rng: random.Random) -> str:
    """ "in the riverside near the Cathedral", either part alone, or "" when neither is known."""
    parts = []
    if "area" in record:
        parts.append(rng.choice((f"in the {record['area']}", f"in the {record['area']} area")))
    if "near" in record:
        parts.append(rng.choice((f"near {record['near']}", f"close to {record['near']}")))
    return " ".join(parts)


def description(record: Record, with_food: bool = True) -> str:
    """ "an Italian pub", or "a pub" without the food."""
    if with_food and "food" in record:
        return with_article(f"{record['food']} {record['type']}")
    return with_article(record["type"])


class Sentence:
    """The fields of one record still to be said, in a random order, and their phrases."""

    def __init__(self, record: Record, rng: random.Random):
        self.record, self.rng = record, rng
        self.unsaid = [f for f in FIELDS if f in record and f != "name"]
        rng.shuffle(self.unsaid)

    def take(self, *fields: str) -> list[str]:
        """The fields among `fields` the record has and that are not said yet; now said."""
        taken = [f for f in self.unsaid if f in fields]
        self.unsaid = [f for f in self.unsaid if f not in taken]
        return taken

    def predicate_list(self, *fields: str) -> list[str]:
        """["has cheap prices", "is kid friendly"] for the given (default: all unsaid) fields."""
        taken = self.take(*fields) if fields else self.take(*FIELDS)
        return [predicate(f, self.record[f], self.rng) for f in taken]

    def predicates(self, *fields: str) -> str:
        """ "has cheap prices and is kid friendly", or "" when none of the fields is unsaid."""
        said = self.predicate_list(*fields)
        return join_and(said) if said else ""

    def location(self) -> str:
        self.take("area", "near")
        return location(self.record, self.rng)

    def description(self, with_food: bool = True) -> str:
        self.take(*(("type", "food") if with_food else ("type",)))
        return description(self.record, with_food)

    def withs(self) -> str:
        """ "with cheap prices and a high customer rating", or ""."""
        taken = self.take("price", "rating")
        return "with " + join_and([with_phrase(f, self.record[f]) for f in taken]) if taken else ""

    def rest(self) -> str:
        """A closing " It ... ." for whatever is still unsaid, or ""."""
        said = self.predicates()
        return f" It {said}." if said else ""


def words(*parts: str) -> str:
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------- templates
# Each template says every field of the record: what its pattern leaves is said by s.rest().


def t_description(r: Record, s: Sentence) -> str:
    """The Golden Fork is an Italian pub in the riverside. It has cheap prices."""
    return words(r["name"], "is", s.description(), s.location()) + "." + s.rest()


def t_location_first(r: Record, s: Sentence) -> str:
    """In the riverside, The Golden Fork is an Italian pub that has cheap prices."""
    place = s.location()
    head = f"{capitalise(place)}, {r['name']}" if place else r["name"]
    kind = s.description(with_food=False)
    said = s.predicates()
    return words(head, "is", kind, "that" if said else "", said) + "."


def t_predicates(r: Record, s: Sentence) -> str:
    """The Golden Fork is a pub, serves Italian food, is in the riverside and has cheap prices."""
    return f"{r['name']} {join_and(s.predicate_list('type') + s.predicate_list())}."


def t_there_is(r: Record, s: Sentence) -> str:
    """There is an Italian pub called The Golden Fork in the riverside. It has cheap prices."""
    return words("There is", s.description(), "called", r["name"], s.location()) + "." + s.rest()


def t_apposition(r: Record, s: Sentence) -> str:
    """The Golden Fork, a pub in the riverside, serves Italian food and has cheap prices."""
    head = words(s.description(with_food=False), s.location())
    said = s.predicates()
    if not said:  # the apposition holds every field: no verb is left for the sentence
        return f"{r['name']} is {head}."
    return f"{r['name']}, {head}, {said}."


def t_question(r: Record, s: Sentence) -> str:
    """Looking for an Italian pub in the riverside? Try The Golden Fork. It has cheap prices."""
    wanted = words(s.description(), s.location())
    return f"Looking for {wanted}? Try {r['name']}." + s.rest()


def t_located(r: Record, s: Sentence) -> str:
    """Located in the riverside, The Golden Fork is an Italian pub with cheap prices."""
    place = s.location()
    head = f"Located {place}, {r['name']}" if place else r["name"]
    return words(head, "is", s.description(), s.withs()) + "." + s.rest()


def t_with_first(r: Record, s: Sentence) -> str:
    """With cheap prices and a high customer rating, The Golden Fork is an Italian pub in the riverside."""
    withs = s.withs()
    head = f"{capitalise(withs)}, {r['name']}" if withs else r["name"]
    return words(head, "is", s.description(), s.location()) + "." + s.rest()


def t_relative(r: Record, s: Sentence) -> str:
    """The Golden Fork is a pub that serves Italian food. It is in the riverside and has cheap prices."""
    kind = s.description(with_food=False)
    first = s.predicates("food", "price", "rating") or s.predicates(*s.unsaid[:1])
    return words(r["name"], "is", kind, "that" if first else "", first) + "." + s.rest()


def t_serving(r: Record, s: Sentence) -> str:
    """Serving Italian food in the riverside, The Golden Fork is a pub with cheap prices."""
    food = s.take("food")
    place = s.location()
    lead = words(f"serving {food_noun(r['food'])}" if food else "", place)
    head = f"{capitalise(lead)}, {r['name']}" if lead else r["name"]
    return words(head, "is", s.description(with_food=False), s.withs()) + "." + s.rest()


Template = Callable[[Record, Sentence], str]
TEMPLATES: tuple[Template, ...] = (t_description, t_location_first, t_predicates, t_there_is, t_apposition,
                                   t_question, t_located, t_with_first, t_relative, t_serving)


def render(record: Record, rng: random.Random, template: Template | None = None) -> str:
    """One English rendering of `record` (a random template unless one is given)."""
    template = template or rng.choice(TEMPLATES)
    return template(record, Sentence(record, rng))


ATTEMPTS_PER_TEMPLATE = 3


def render_distinct(record: Record, rng: random.Random, count: int) -> list[str]:
    """`count` different renderings of `record`, each by a different template."""
    if not 1 <= count <= len(TEMPLATES):
        raise HsdError(f"cannot render a record {count} ways: there are {len(TEMPLATES)} templates")
    texts: list[str] = []
    for template in rng.sample(TEMPLATES, len(TEMPLATES)):
        for _ in range(ATTEMPTS_PER_TEMPLATE):  # a sparse record can make two patterns coincide
            text = render(record, rng, template)
            if text not in texts:
                texts.append(text)
                break
        if len(texts) == count:
            return texts
    raise HsdError(f"only {len(texts)} different renderings of {format_record(record)}")


# ---------------------------------------------------------------- splits


@dataclasses.dataclass(frozen=True)
class Splits:
    """Training pairs and dev records (source, references); no dev source occurs in train."""

    train: list[Pair]
    dev: list[tuple[str, list[str]]]

    def dev_pairs(self) -> list[Pair]:
        """One (source, reference) pair per reference, grouped by source."""
        return [(source, ref) for source, refs in self.dev for ref in refs]


def distinct_records(rng: random.Random, count: int) -> list[Record]:
    """`count` records with pairwise different sources."""
    records: list[Record] = []
    seen: set[str] = set()
    while len(records) < count:
        record = random_record(rng)
        source = format_record(record)
        if source not in seen:
            seen.add(source)
            records.append(record)
    return records


def make_splits(seed: int = 0, num_train: int = 3000, num_dev: int = 100, refs_per_dev: int = 4,
                renderings_per_train_record: int = 2) -> Splits:
    """`num_train` training pairs (`renderings_per_train_record` per record) and `num_dev` dev
    records with `refs_per_dev` references each, all from distinct records."""
    if num_train < 1 or num_dev < 1:
        raise HsdError(f"num_train ({num_train}) and num_dev ({num_dev}) must be positive")
    rng = random.Random(seed)
    per_record = renderings_per_train_record
    num_train_records = -(-num_train // per_record)
    records = distinct_records(rng, num_dev + num_train_records)
    dev = [(format_record(r), render_distinct(r, rng, refs_per_dev)) for r in records[:num_dev]]
    train = [(format_record(r), text) for r in records[num_dev:] for text in render_distinct(r, rng, per_record)]
    train = train[:num_train]
    rng.shuffle(train)
    return Splits(train=train, dev=dev)


def write_splits(splits: Splits, folder: str | os.PathLike) -> tuple[Path, Path]:
    """Writes `train.jsonl` and `dev.jsonl` (one line per reference) atomically; returns their paths."""
    from hsd_jax import io

    folder = Path(folder)
    train_path, dev_path = folder / TRAIN_FILE, folder / DEV_FILE
    io.write_jsonl(train_path, ({"source": s, "target": t} for s, t in splits.train))
    io.write_jsonl(dev_path, ({"source": s, "target": t} for s, t in splits.dev_pairs()))
    return train_path, dev_path
