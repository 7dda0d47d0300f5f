"""The built-in filters, by the `type:` a policy names them with. Heavy imports (torch, transformers) happen only
when a policy uses a filter that needs them."""

from __future__ import annotations

from services.safety.filters.base import Filter
from services.safety.filters.blocklist import BlocklistFilter

FILTER_TYPES: dict[str, type[Filter]] = {
    BlocklistFilter.type: BlocklistFilter,
}
