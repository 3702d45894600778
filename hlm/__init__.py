"""hlm: uncertainty- and importance-aware hybrid decoding of a small on-device LM with a large cloud LM.

Entry points: `hlm.session` (the front ends' door), `hlm.models.load_pair`, `hlm.decoder.HybridDecoder`,
`python -m hlm`. Kept import-free so that light modules (`python -m hlm.models.embedded`, `--help`) do not pay for
importing torch.
"""

__version__ = "0.1.0"
