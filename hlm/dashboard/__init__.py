"""The web dashboard (being split into modules)."""

from hlm.dashboard.flows import *  # noqa: F403
