"""The command line (`python -m hlm`): argparse lives here and nowhere else in `hlm`; the commands reach the
library through plain functions (`hlm.session` and the experiments' own)."""

from hlm.cli.args import UsageError, add_cloud_args, add_model_args, add_run_args, run_config
from hlm.cli.main import build_parser, main

__all__ = ["UsageError", "add_cloud_args", "add_model_args", "add_run_args", "build_parser", "main", "run_config"]
