"""drllm's model side: base models, layer plans, the routed executor, routers and the offline pipeline."""

from .plan import LayerPlan

__all__ = ["LayerPlan"]
