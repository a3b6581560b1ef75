"""The schema as of zoedge 0.1 (devices, bundles, patches): what `Base.metadata.create_all` made before
migrations existed. A database made that way is stamped at this revision, not re-created.

Revision ID: 0001
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
        "devices",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "bundles",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("base_sha256", sa.String(64), nullable=False),
        sa.Column("initial_sha256", sa.String(64), nullable=False),
        sa.Column("manifest", sa.JSON, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_bundles_base_sha256", "bundles", ["base_sha256"])
    op.create_table(
        "patches",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("device_id", sa.String(32), sa.ForeignKey("devices.id"), nullable=True),
        sa.Column("bundle_id", sa.String(64), sa.ForeignKey("bundles.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("archive_sha256", sa.String(64), nullable=False),
        sa.Column("adapter_blob", sa.String(64), nullable=False),
        sa.Column("adapter_sha256", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("steps", sa.Integer, nullable=False),
        sa.Column("examples", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("parent_ids", sa.JSON, nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_patches_device_id", "patches", ["device_id"])
    op.create_index("ix_patches_bundle_id", "patches", ["bundle_id"])
    op.create_index("ix_patches_version", "patches", ["version"])
    op.create_index("uq_global_version", "patches", ["bundle_id", "version"], unique=True,
                    sqlite_where=sa.text("kind = 'global'"), postgresql_where=sa.text("kind = 'global'"))


def downgrade() -> None:
    op.drop_table("patches")
    op.drop_table("bundles")
    op.drop_table("devices")
