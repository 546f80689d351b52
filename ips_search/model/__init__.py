"""The IPS model: patch encoders, cross-attention transformer, and IPSNet. Knows nothing of Ray."""

from ips_search.model.encoders import build_encoder
from ips_search.model.ips import IPSNet
from ips_search.model.transformer import Transformer

__all__ = ["IPSNet", "Transformer", "build_encoder"]
