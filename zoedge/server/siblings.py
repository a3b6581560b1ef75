"""Sibling bundles (issue 16): exports of one base with one selection of trainables (other --quant, --format,
--target or --copies) share a sibling key (zoedge.manifest.Manifest.sibling_key, kept in bundles.sibling_key), and
a patch trained on one fits every other. The server keeps one patch history per sibling group:

- a patch is stored once, under the bundle it was pushed for (or the one it names), and served to the whole group:
  listing a bundle's patches lists its siblings' too, and a device pulls them by id as usual;
- a round (the patches uploaded since the latest global version) and the global versions are the group's, and an
  aggregate of any sibling is kept under the group's first published bundle, so its versions stay unique.

A bundle without a key (none can be left after migration 0003, which fills it from the stored manifests) is a group
of its own."""

from __future__ import annotations

from fastapi import HTTPException, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest
from zoedge.patchdoc import PatchDoc, trainables_digest
from zoedge.server.models import Bundle


def group(db: Session, bundle: Bundle) -> list[Bundle]:
    """The bundle and its siblings, first published first."""
    if not bundle.sibling_key:
        return [bundle]
    return list(db.scalars(select(Bundle).where(Bundle.sibling_key == bundle.sibling_key)
                           .order_by(Bundle.created, Bundle.id)))


def group_ids(db: Session, bundle_id: str) -> list[str]:
    """Ids of the bundle's group ([bundle_id] for an unknown id: it matches nothing, as before)."""
    bundle = db.get(Bundle, bundle_id)
    return [b.id for b in group(db, bundle)] if bundle is not None else [bundle_id]


def group_head(db: Session, bundle: Bundle) -> Bundle:
    """The group's first published bundle: where its aggregates are kept."""
    return group(db, bundle)[0]


def fit_target(db: Session, doc: PatchDoc, target: Bundle) -> Manifest:
    """The manifest of the bundle a patch is pushed for, once the patch is checked to fit it; refused with a
    one-line 422 otherwise (other trainables, base, labels or initial tensors: not a sibling)."""
    manifest = Manifest.from_dict(target.manifest)
    if doc.trainables_sha256 and doc.trainables_sha256 != trainables_digest(manifest):
        origin = db.get(Bundle, doc.bundle_id) if doc.bundle_id else None
        theirs = f" ({describe(Manifest.from_dict(origin.manifest))})" if origin is not None else ""
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"patch refused for bundle {target.id[:12]}: it trains other tensors{theirs} than this "
                            f"bundle ({describe(manifest)}); only siblings (same base and trainables) share patches")
    try:
        doc.check_fits(manifest, f"bundle {target.id[:12]}")
    except ZoedgeError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"patch refused: bundle {target.id[:12]} is no sibling of the bundle it was trained on "
                            f"({e})") from None
    return manifest


def describe(m: Manifest) -> str:
    """What a bundle trains, in a few words: '10 tensors, 9,346 values, LoRA r=8 on q,v'."""
    lora = f", LoRA r={m.lora.rank} on {','.join(m.lora.targets)}" if m.lora else ""
    return f"{len(m.trainables)} tensors, {m.num_trainable:,} values{lora}"
