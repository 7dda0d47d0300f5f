"""The built-in filters, by the `type:` a policy names them with. Heavy imports (torch, transformers) happen
only when a policy uses a filter that needs them."""

from __future__ import annotations

from services.safety.filters.base import Filter
from services.safety.filters.blocklist import BlocklistFilter
from services.safety.filters.clip_concepts import ClipConceptsFilter
from services.safety.filters.external import ExternalFilter
from services.safety.filters.sd_safety_checker import SdSafetyCheckerFilter
from services.safety.filters.text_classifier import TextClassifierFilter

FILTER_TYPES: dict[str, type[Filter]] = {
    cls.type: cls
    for cls in (
        BlocklistFilter,
        ClipConceptsFilter,
        TextClassifierFilter,
        SdSafetyCheckerFilter,
        ExternalFilter,
    )
}
