"""The embedded demo task: property-listing text -> JSON record.

Generated deterministically by this module (``python -m workers.demo_task`` rewrites the shipped
JSONL files under ``workers/demo_data/``). It is deliberately not trivial so that hyperparameters
matter: seven fields, a list of canonical features behind varied wording, several phrasings of
every number, and distractor numbers (HOA fees, year built, parking spots, distances).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "demo_data"
SPLIT_SIZES = {"train": 480, "validation": 24, "test": 48}
_SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}

SYSTEM_PROMPT = "Listing to JSON."  # short on purpose: every token is paid for in training

CITIES = [
    "Austin",
    "Denver",
    "Portland",
    "Boston",
    "Seattle",
    "Chicago",
    "Phoenix",
    "Atlanta",
    "Madison",
    "Raleigh",
    "Tucson",
    "Omaha",
    "Boise",
    "Tampa",
    "Dallas",
    "Reno",
]
PROPERTY_TYPES = {
    "house": ["house", "single-family home", "detached house", "family home"],
    "condo": ["condo", "condominium", "condo unit"],
    "apartment": ["apartment", "flat", "apartment unit"],
    "townhouse": ["townhouse", "townhome", "row house"],
}
# canonical feature -> ways listings mention it
FEATURES = {
    "balcony": ["a balcony", "a private balcony", "a sunny balcony"],
    "central_air": ["central air", "central AC", "whole-house A/C"],
    "fireplace": ["a fireplace", "a wood-burning fireplace", "a gas fireplace"],
    "garage": ["a garage", "an attached garage", "a two-car garage"],
    "garden": ["a garden", "a backyard garden", "a landscaped yard"],
    "gym": ["a gym", "a fitness center", "an on-site gym"],
    "hardwood_floors": ["hardwood floors", "original hardwood", "oak flooring"],
    "in_unit_laundry": ["in-unit laundry", "a washer/dryer", "W/D in unit"],
    "pool": ["a pool", "a swimming pool", "an in-ground pool"],
    "solar": ["solar panels", "rooftop solar", "owned solar"],
}
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]


def _price_text(rng: random.Random, price: int) -> str:
    style = rng.randrange(3)
    if style == 0:
        return f"${price:,}"
    if style == 1:
        return f"${price // 1000}k"
    return f"{price / 1e6:.3g}M" if price >= 1_000_000 else f"${price:,}"


def _beds_text(rng: random.Random, beds: int) -> str:
    return rng.choice(
        [f"{beds} bed", f"{beds}BR", f"{_NUMBER_WORDS[beds]}-bedroom", f"{beds} bedrooms"]
    )


def _baths_text(rng: random.Random, baths: float) -> str:
    n = f"{baths:g}"
    return rng.choice([f"{n} bath", f"{n}BA", f"{n} bathrooms"])


def _distractor(rng: random.Random) -> str:
    return rng.choice(
        [
            f"HOA ${rng.randrange(80, 600)}/month.",
            f"Built in {rng.randrange(1925, 2024)}.",
            f"{rng.randrange(1, 4)} parking spots.",
            f"{rng.randrange(2, 15)} miles from downtown.",
            f"Lot size {rng.randrange(2, 30) * 500:,} sqft.",
            f"Taxes ${rng.randrange(2, 15) * 1000:,}/yr.",
            f"Listed {rng.randrange(2, 60)} days ago.",
        ]
    )


def make_example(rng: random.Random) -> tuple[str, dict]:
    """One listing text and its JSON record."""
    ptype = rng.choice(sorted(PROPERTY_TYPES))
    beds = rng.randrange(1, 6) if ptype != "apartment" else rng.randrange(0, 4)
    baths = rng.choice([1, 1.5, 2, 2.5, 3, 3.5]) if beds > 1 else rng.choice([1, 1.5])
    sqft = rng.randrange(45, 400) * 10
    price = rng.randrange(15, 250) * 5000 if rng.random() < 0.85 else rng.randrange(21, 60) * 50000
    city = rng.choice(CITIES)
    feats = sorted(rng.sample(sorted(FEATURES), rng.randrange(0, 4)))

    ptype_text = rng.choice(PROPERTY_TYPES[ptype])
    beds_text = "studio" if beds == 0 else _beds_text(rng, beds)
    parts = [
        rng.choice(
            [
                f"{beds_text}, {_baths_text(rng, baths)} {ptype_text} in {city}.",
                f"{city}: {ptype_text} with {beds_text} and {_baths_text(rng, baths)}.",
                f"For sale in {city} - {beds_text} {ptype_text}, {_baths_text(rng, baths)}.",
            ]
        ),
        rng.choice([f"{sqft:,} sq ft.", f"{sqft} sqft of living space.", f"Approx. {sqft:,} ft2."]),
        rng.choice(
            [
                f"Asking {_price_text(rng, price)}.",
                f"Price: {_price_text(rng, price)}.",
                f"Offered at {_price_text(rng, price)}.",
            ]
        ),
    ]
    if feats:
        mentions = [rng.choice(FEATURES[f]) for f in feats]
        rng.shuffle(mentions)
        parts.append(
            rng.choice(["Features ", "Comes with ", "Includes "]) + ", ".join(mentions) + "."
        )
    for _ in range(rng.randrange(1, 3)):
        parts.insert(rng.randrange(1, len(parts) + 1), _distractor(rng))
    record = {
        "property_type": ptype,
        "city": city,
        "beds": beds,
        "baths": baths,
        "sqft": sqft,
        "price_usd": price,
        "features": feats,
    }
    return " ".join(parts), record


def make_split(split: str) -> list[dict]:
    """Rows of one split in the chat JSONL format users bring."""
    rng = random.Random(_SPLIT_SEEDS[split])
    rows = []
    for _ in range(SPLIT_SIZES[split]):
        text, record = make_example(rng)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": json.dumps(record, separators=(",", ":"))},
                ]
            }
        )
    return rows


def split_path(split: str) -> Path:
    return DATA_DIR / f"{split}.jsonl"


def write_splits(out_dir: Path = DATA_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_SIZES:
        with open(out_dir / f"{split}.jsonl", "w") as f:
            for row in make_split(split):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write_splits()
    print(f"wrote {', '.join(SPLIT_SIZES)} to {DATA_DIR}")
