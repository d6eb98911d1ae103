"""Model Stock (Jang et al., ECCV 2024): average the fine-tunes, then move toward the base by a
ratio computed from the angle between their task vectors. mergekit's ``model_stock``."""

from __future__ import annotations

from .base import MethodParams, TensorwiseMethod, register


class ModelStockParams(MethodParams):
    filter_wise: bool = False  # one ratio per output row instead of per tensor


@register
class ModelStock(TensorwiseMethod):
    name = "model_stock"
    function = "model_stock"
    Params = ModelStockParams
    needs_base = True
    summary = "average of fine-tunes pulled toward the base by their angle"
