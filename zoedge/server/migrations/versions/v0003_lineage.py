"""Sibling bundles (issue 16): bundles.sibling_key, the manifest's sibling_key (same base, trainables, initial
tensors and labels: the bundles that share patches, zoedge/server/siblings.py). Bundles already published get it
from their stored manifest (a manifest older than lineage derives one); one that does not load stays NULL, a group
of its own.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from typing import Any, Optional

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def sibling_key(manifest: Any) -> Optional[str]:
    from zoedge.errors import ZoedgeError
    from zoedge.manifest import Manifest

    try:
        return Manifest.from_dict(manifest).sibling_key
    except (ZoedgeError, TypeError, ValueError, AttributeError):
        return None


def upgrade() -> None:
    with op.batch_alter_table("bundles") as batch:
        batch.add_column(sa.Column("sibling_key", sa.String(64), nullable=True))
        batch.create_index("ix_bundles_sibling_key", ["sibling_key"])
    bundles = sa.table("bundles", sa.column("id", sa.String), sa.column("manifest", sa.JSON),
                       sa.column("sibling_key", sa.String))
    bind = op.get_bind()
    for bundle_id, manifest in bind.execute(sa.select(bundles.c.id, bundles.c.manifest)).all():
        key = sibling_key(manifest)
        if key is not None:
            bind.execute(bundles.update().where(bundles.c.id == bundle_id).values(sibling_key=key))


def downgrade() -> None:
    with op.batch_alter_table("bundles") as batch:
        batch.drop_index("ix_bundles_sibling_key")
        batch.drop_column("sibling_key")
