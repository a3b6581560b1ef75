"""Rows by id or by a unique id prefix, as git takes abbreviated commit ids: the dashboard and the CLI show short
ids, and a user who copies one gets the row (or a 400 saying the prefix is ambiguous)."""

from __future__ import annotations

from typing import Optional, TypeVar

from fastapi import HTTPException, status
from sqlalchemy import select
from sqlalchemy.orm import Session

MIN_PREFIX = 4  # as git: shorter abbreviations are refused
T = TypeVar("T")


def by_id_or_prefix(db: Session, model: type[T], ident: str, what: str, where=None) -> Optional[T]:
    """The row whose id is `ident`, else the one row whose id starts with it (None: no such row). `where`: an
    extra filter (what the caller may see), applied to prefix matches; an exact id is checked by the caller."""
    row = db.get(model, ident)
    if row is not None or len(ident) < MIN_PREFIX:
        return row
    q = select(model).where(model.id.startswith(ident, autoescape=True))
    if where is not None:
        q = q.where(where)
    matches = list(db.scalars(q.order_by(model.id).limit(6)))
    if len(matches) > 1:
        shown = ", ".join(m.id for m in matches[:5])
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"{what} id prefix {ident!r} is ambiguous: it matches {shown}"
                            f"{', ...' if len(matches) > 5 else ''}; give more characters")
    return matches[0] if matches else None
