"""The demo's data-to-text task: deterministic, disjoint splits, every field said in every text."""

from __future__ import annotations

import random
import re

import pytest

from hsd_jax import demo_data
from hsd_jax.data import read_pairs
from hsd_jax.errors import HsdError
from hsd_jax.evaluate import group_references

SMALL = dict(num_train=200, num_dev=20, refs_per_dev=4)


@pytest.fixture(scope="module")
def splits():
    return demo_data.make_splits(seed=0, **SMALL)


def says_field(text: str, field: str, value: str) -> bool:
    """Whether `text` mentions the field's value in one of the ways a rendering may say it."""
    if field == "family":
        negated = " not " in text
        return re.search(r"family friendly|kid friendly|welcome", text) is not None and negated == (value == "no")
    if field == "price":
        return re.search(rf"\b{value} price|prices are {value}\b", text) is not None
    if field == "rating":
        return re.search(rf"\b{value} customer rating|rated {value} by", text) is not None
    if field == "food":
        return re.search(rf"\b{value}\b", text) is not None
    return value in text  # name, type, area, near: said as they are


def assert_says_record(source: str, text: str) -> None:
    record = demo_data.parse_record(source)
    for field, value in record.items():
        assert says_field(text, field, value), (field, value, text)


def test_same_seed_same_data_and_other_seed_other_data(splits):
    assert demo_data.make_splits(seed=0, **SMALL) == splits
    other = demo_data.make_splits(seed=1, **SMALL)
    assert other.train != splits.train and other.dev != splits.dev


def test_sizes_as_requested(splits):
    assert len(splits.train) == SMALL["num_train"]
    assert len(splits.dev) == SMALL["num_dev"]
    assert all(len(refs) == SMALL["refs_per_dev"] for _, refs in splits.dev)
    odd = demo_data.make_splits(seed=3, num_train=7, num_dev=2, refs_per_dev=6, renderings_per_train_record=3)
    assert len(odd.train) == 7 and [len(refs) for _, refs in odd.dev] == [6, 6]


def test_defaults_fit_a_few_minutes_demo():
    default = demo_data.make_splits()
    assert len(default.train) == 3000 and len(default.dev) == 100
    assert all(len(refs) == 4 for _, refs in default.dev)


def test_dev_records_are_distinct_and_absent_from_train(splits):
    dev_sources = [s for s, _ in splits.dev]
    assert len(set(dev_sources)) == len(dev_sources)
    assert not set(dev_sources) & {s for s, _ in splits.train}


def test_train_has_several_renderings_per_record(splits):
    per_source: dict[str, set[str]] = {}
    for source, target in splits.train:
        per_source.setdefault(source, set()).add(target)
    assert max(len(t) for t in per_source.values()) >= 2


def test_every_field_is_said_in_every_text(splits):
    for source, target in splits.train:
        assert_says_record(source, target)
    for source, refs in splits.dev:
        for ref in refs:
            assert_says_record(source, ref)


def test_every_template_says_every_field_of_varied_records():
    rng = random.Random(5)
    full = {"name": "The Blue Swan", "type": "coffee shop", "food": "Indian", "area": "old town", "price": "low",
            "rating": "1 out of 5", "family": "no", "near": "the Cathedral"}
    records = [full] + [demo_data.random_record(rng) for _ in range(100)]
    for record in records:
        source = demo_data.format_record(record)
        for template in demo_data.TEMPLATES:
            text = demo_data.render(record, rng, template)
            assert_says_record(source, text)
            assert text[0].isupper() and text.endswith(".") and "  " not in text, text


def test_references_of_a_dev_record_differ(splits):
    for _, refs in splits.dev:
        assert len(set(refs)) == len(refs)


def test_source_round_trip_and_varied_lengths(splits):
    sources = [s for s, _ in splits.train]
    for source in sources:
        record = demo_data.parse_record(source)
        assert demo_data.format_record(record) == source
        assert set(demo_data.REQUIRED) <= set(record)
        assert len(set(record) & set(demo_data.OPTIONAL)) >= demo_data.MIN_OPTIONAL
    assert len({len(demo_data.parse_record(s)) for s in sources}) >= 4


def test_names_are_many_and_distinct():
    assert len(set(demo_data.NAMES)) == len(demo_data.NAMES) >= 40


def test_too_many_references_is_an_error():
    with pytest.raises(HsdError, match="templates"):
        demo_data.make_splits(num_train=2, num_dev=1, refs_per_dev=len(demo_data.TEMPLATES) + 1)


def test_read_pairs_reads_the_written_files(splits, tmp_path):
    train_path, dev_path = demo_data.write_splits(splits, tmp_path / "demo")
    assert read_pairs(train_path) == splits.train
    dev_pairs = read_pairs(dev_path)
    assert dev_pairs == splits.dev_pairs()
    sources, refs = group_references(dev_pairs)
    assert list(zip(sources, refs)) == splits.dev
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["dev.jsonl", "train.jsonl"]
