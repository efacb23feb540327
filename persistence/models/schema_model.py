from __future__ import annotations

from sqlalchemy import Text
from sqlalchemy.orm import Mapped, mapped_column

from persistence.models.base import Base


class SchemaModel(Base):
    """One row: the oldest code revision this schema still serves (persistence.schema).

    A migration that only extends the schema (new tables, nullable columns, indexes) leaves it;
    one that older code would misuse moves it to its own revision.
    """

    __tablename__ = "tasklane_schema"

    oldest_code_revision: Mapped[str] = mapped_column(Text, primary_key=True)
