"""The price catalog: $/hour per accelerator as data, with source and date per row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.errors import SpecError

DEFAULT_CATALOG = Path(__file__).with_name("prices.yaml")


@dataclass(frozen=True)
class Price:
    accelerator: str
    price_usd_per_hour: float  # per GPU; per core for `cpu`
    source: str
    date: str
    memory_gib: float | None = None  # per GPU; None for cpu


def load_catalog(
    path: Path | None = None, overrides: dict[str, float] | None = None
) -> dict[str, Price]:
    """Catalog rows by accelerator name, with ``overrides`` ($/hour) applied on top."""
    path = path or DEFAULT_CATALOG
    if not Path(path).is_file():
        raise SpecError("prices.catalog", f"file {path} not found; fix the path or remove the key")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    rows = {}
    for name, row in (raw.get("accelerators") or {}).items():
        price = float(row.get("price_usd_per_hour", 0))
        if price <= 0:
            raise SpecError(f"prices.catalog ({path}): {name}", f"price must be > 0 (got {price})")
        rows[name] = Price(
            name, price, str(row.get("source", "")), str(row.get("date", "")), row.get("memory_gib")
        )
    for name, price in (overrides or {}).items():
        if price <= 0:
            raise SpecError(f"prices.overrides.{name}", f"price must be > 0 (got {price})")
        base = rows.get(name)
        rows[name] = Price(
            name, float(price), "user override", "", base.memory_gib if base else None
        )
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
