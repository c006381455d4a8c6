"""Alembic revisions of the service's tables (one file per schema change)."""
