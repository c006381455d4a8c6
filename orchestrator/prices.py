"""The price catalog: $/hour per accelerator as data, on-demand and spot, with source and date per
row. A sweep bills at one market's rates (``prices.market`` in the spec)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.errors import SpecError

DEFAULT_CATALOG = Path(__file__).with_name("prices.yaml")
MARKETS = ("on_demand", "spot")


@dataclass(frozen=True)
class Price:
    accelerator: str
    price_usd_per_hour: float  # per GPU; per core for `cpu`
    source: str
    date: str
    memory_gib: float | None = None  # per GPU; None for cpu


def _positive_price(where: str, value) -> float:
    try:
        price = float(value)
    except (TypeError, ValueError):
        raise SpecError(where, f"price must be a number of USD per hour (got {value!r})") from None
    if price <= 0:
        raise SpecError(where, f"price must be > 0 (got {price})")
    return price


def _row(name: str, row: dict, market: str, where: str) -> Price | None:
    if market == "spot":
        if "spot_usd_per_hour" not in row:
            return None  # no spot market for it: only an override can price it
        price = _positive_price(f"{where}.spot_usd_per_hour", row["spot_usd_per_hour"])
        source, date = row.get("spot_source", ""), row.get("spot_date", "")
    else:
        price = _positive_price(f"{where}.price_usd_per_hour", row.get("price_usd_per_hour", 0))
        source, date = row.get("source", ""), row.get("date", "")
    return Price(name, price, str(source), str(date), row.get("memory_gib"))


def load_catalog(
    path: Path | None = None,
    overrides: dict[str, float] | None = None,
    market: str = "on_demand",
) -> dict[str, Price]:
    """Catalog rows by accelerator name at ``market`` rates (``on_demand`` or ``spot``), with
    ``overrides`` ($/hour) applied on top. Every price must be > 0."""
    if market not in MARKETS:
        raise SpecError("prices.market", f"unknown market {market!r}; use one of {MARKETS}")
    path = path or DEFAULT_CATALOG
    if not Path(path).is_file():
        raise SpecError("prices.catalog", f"file {path} not found; fix the path or remove the key")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    rows = {}
    memory = {}
    for name, row in (raw.get("accelerators") or {}).items():
        memory[name] = row.get("memory_gib")
        price = _row(name, row, market, f"prices.catalog ({path}): {name}")
        if price is not None:
            rows[name] = price
    for name, value in (overrides or {}).items():
        price = _positive_price(f"prices.overrides.{name}", value)
        rows[name] = Price(name, price, "user override", "", memory.get(name))
    return rows


def trial_price_usd_per_hour(
    catalog: dict[str, Price], accelerator: str, gpus: int, cpus: int
) -> float:
    """What one trial's resources cost per hour: GPUs x GPU price (CPUs come with GPU machines),
    or cores x core price on CPU."""
    if accelerator not in catalog:
        raise SpecError(
            "resources.accelerator",
            f"no price for {accelerator!r}; known: {', '.join(sorted(catalog))}. "
            f"Add one with prices: {{overrides: {{{accelerator}: <usd per hour>}}}}",
        )
    units = cpus if accelerator == "cpu" else gpus
    return units * catalog[accelerator].price_usd_per_hour


def cost_usd(price_usd_per_hour: float, billed_s: float) -> float:
    return price_usd_per_hour * billed_s / 3600.0
