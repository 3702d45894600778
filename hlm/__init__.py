"""hlm: uncertainty- and importance-aware hybrid decoding of a small on-device LM with a large cloud LM."""

from hlm.config import LinkConfig, PolicyConfig, RunConfig, SamplingConfig
from hlm.decoder import HybridDecoder
from hlm.events import Summary, TokenEvent
from hlm.models import ModelPair, load_pair

__all__ = ["HybridDecoder", "LinkConfig", "ModelPair", "PolicyConfig", "RunConfig", "SamplingConfig", "Summary",
           "TokenEvent", "load_pair"]
