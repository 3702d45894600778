"""The selection study (`python -m hlm study`); its modules follow in the next commit."""

from hlm.experiments.study.metrics import *  # noqa: F403
