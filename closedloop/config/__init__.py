"""Configuration: typed schema (:mod:`.schema`) and validated loading (:mod:`.load`)."""

from closedloop.config.load import config_to_dict, load_config, parse_overrides
from closedloop.config.schema import Config

__all__ = ["Config", "config_to_dict", "load_config", "parse_overrides"]
