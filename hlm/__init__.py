"""hlm: uncertainty- and importance-aware hybrid decoding of a small on-device LM with a large cloud LM.

Entry points: `hlm.session` (the front ends' door), `hlm.models.load_pair`, `hlm.decoder.HybridDecoder`,
`python -m hlm`. Kept free of heavy imports so that light modules (`python -m hlm.models.embedded`, `--help`) do
not pay for importing torch.
"""

from importlib import resources
from pathlib import Path

__version__ = "0.1.0"

# The package's data (prompt sets, selection calibrations, the page's css, js and examples) ships inside it
# (pyproject's package-data), so an installed hlm finds it as a checkout does; a package on disk gives a Path.
ASSETS: Path = resources.files(__name__) / "assets"
