"""Methods, one file each, registered under the file's name. Importing this package imports
every module in it (`semiseg.registry.import_modules`), so a new method file is registered
(and tested) the moment it is added."""

from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.registry import (FULL_SUPERVISION_METHOD, METHODS, check_method,
                                      check_method_params, method_config)
from semiseg.methods.stages import PseudoLabelStage, Stage, TrainStage
from semiseg.registry import import_modules

# The package's helper modules: everything else is a method file.
_NOT_METHODS = {"base", "common", "cutmix", "local_contrastive_loss", "losses", "registry", "stages"}

import_modules(__name__, __path__, skip=_NOT_METHODS)

__all__ = ["Batch", "Method", "StepOutput", "METHODS", "FULL_SUPERVISION_METHOD", "check_method",
           "check_method_params", "method_config", "PseudoLabelStage", "Stage", "TrainStage"]
