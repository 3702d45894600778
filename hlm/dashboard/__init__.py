"""The web dashboard's library side; `app.py` only lays out and wires the Gradio components, so all of this is tested
without a server (nothing here imports Gradio). One job per module: `settings` (what a viewer sets, each knob
declared once in `KNOBS`), `runs` (a run as the page keeps it, no HTML), `service` (models, streaming, reference
cache, running requests), `render` (HTML), `charts` (plotly figure dicts), `flows` (the page's actions as `Frame`s),
`evidence` (the Evidence tab, read from the committed result files)."""

from hlm.dashboard.flows import Dashboard, Frame, LinkValues, PairInfo
from hlm.dashboard.render import USER_ERRORS
from hlm.dashboard.settings import KNOBS, Settings

__all__ = ["KNOBS", "USER_ERRORS", "Dashboard", "Frame", "LinkValues", "PairInfo", "Settings"]
