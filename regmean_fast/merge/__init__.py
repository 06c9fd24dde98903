"""The merge: config -> plan -> engine -> (methods, io). See docs/merge.md."""

from .api import conv1d_modules, merge, merge_modules, merge_state_dicts
from .config import MergeConfig, ModelSpec, config_from_dict, load_yaml
from .errors import MergeError
from .methods import METHODS
from .sources import DictGramSet, StateDictSource

__all__ = ["merge", "merge_modules", "merge_state_dicts", "conv1d_modules", "MergeConfig", "ModelSpec",
           "config_from_dict", "load_yaml", "MergeError", "METHODS", "DictGramSet", "StateDictSource"]
