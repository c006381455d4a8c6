"""The service's tables: tenants, tokens (hashed), sweeps.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "service_tenants",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("quota_usd", sa.Float(), nullable=True),
        sa.Column("created_unix", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_service_tenants"),
    )
    op.create_table(
        "service_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(8), nullable=False),
        sa.Column("created_unix", sa.Float(), nullable=False),
        sa.Column("revoked_unix", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant"],
            ["service_tenants.name"],
            name="fk_service_tokens_tenant_service_tenants",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_service_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_service_tokens_token_hash"),
    )
    op.create_index("ix_service_tokens_tenant", "service_tokens", ["tenant"])
    op.create_table(
        "service_sweeps",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("budget_usd", sa.Float(), nullable=False),
        sa.Column("predicted_first_rung_usd", sa.Float(), nullable=True),
        sa.Column("spec_yaml", sa.Text(), nullable=False),
        sa.Column("experiment", sa.String(400), nullable=False),
        sa.Column("created_unix", sa.Float(), nullable=False),
        sa.Column("started_unix", sa.Float(), nullable=True),
        sa.Column("ended_unix", sa.Float(), nullable=True),
        sa.Column("end_reason", sa.String(500), nullable=True),
        sa.Column("driver_pid", sa.Integer(), nullable=True),
        sa.Column("driver_started_unix", sa.Float(), nullable=True),
        sa.Column("job_id", sa.String(200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant"],
            ["service_tenants.name"],
            name="fk_service_sweeps_tenant_service_tenants",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_service_sweeps"),
    )
    op.create_index(
        "ix_service_sweeps_tenant_created", "service_sweeps", ["tenant", "created_unix"]
    )
    op.create_index("ix_service_sweeps_state_created", "service_sweeps", ["state", "created_unix"])


def downgrade() -> None:
    op.drop_index("ix_service_sweeps_state_created", table_name="service_sweeps")
    op.drop_index("ix_service_sweeps_tenant_created", table_name="service_sweeps")
    op.drop_table("service_sweeps")
    op.drop_index("ix_service_tokens_tenant", table_name="service_tokens")
    op.drop_table("service_tokens")
    op.drop_table("service_tenants")
