"""lorasweep control plane: spec, budget, search, sweep driver, tracking, registry, CLI."""

__version__ = "0.1.0"
