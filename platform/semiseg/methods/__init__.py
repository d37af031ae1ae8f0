"""Methods, one file each, registered under the file's name. Importing this package imports
every module in it, so a new method file is registered (and tested) the moment it is added."""

import importlib
import pkgutil

from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.registry import METHODS, check_method_params, method_config

_NOT_METHODS = {"base", "losses", "registry", "common"}

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _NOT_METHODS:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Batch", "Method", "StepOutput", "METHODS", "check_method_params", "method_config"]
