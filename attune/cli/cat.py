"""``tune cat CONFIG``: print a config, as written or merged with its bases and overrides."""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attune.config import load_config, resolve_config
from attune.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cat",
        help="print a config",
        description="Print a built-in config (or a YAML file) as written. With overrides, print "
        "the config it becomes: bases merged and overrides applied; with --resolved, also "
        "with every ${...} interpolation resolved.",
    )
    parser.add_argument("config", help="built-in config name (tiny/lora) or YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value to set, ~key to delete")
    parser.add_argument(
        "--resolved",
        action="store_true",
        help="print the merged config with interpolations resolved, instead of the file",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.resolved or args.overrides:
        cfg = load_config(args.config, args.overrides)
        try:
            text = OmegaConf.to_yaml(cfg, resolve=args.resolved)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{args.config}: {str(error).splitlines()[0]}") from None
        print(text, end="")
    else:
        print(resolve_config(args.config).read_text(encoding="utf-8"), end="")
    return 0
