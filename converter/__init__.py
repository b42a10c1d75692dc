"""edgeq's host room (installed as ``edgeq.converter``): conversion, training, evaluation, data and the demo.

Importing this package is cheap; TensorFlow is imported only by the functions that need it.

>>> from edgeq.converter import convert, recipe_from_flags
>>> convert(recipe_from_flags("mobilenet_v2", "model.edgeq", calib="images/", classes=10))

Layout: ``pipeline.py`` runs the convert stages (``stages/``, one module each) with a task adapter (``tasks/``);
``recipes.py`` holds the options as frozen recipes; ``models/`` the Keras models (Bayesian head, detector),
``training/`` what ``edgeq train`` runs, ``evaluation/`` what ``edgeq eval`` runs, ``data/`` datasets and COCO,
``commands/`` the host subcommands of the ``edgeq`` CLI.
"""

from .tf import pin_numerics

pin_numerics()  # before anything of this room imports TensorFlow: the same seed gives the same model (tf.py)

from .pipeline import convert  # noqa: E402
from .recipes import (
    BayesRecipe,
    ClusterRecipe,
    ConvertRecipe,
    InputRecipe,
    QuantMode,
    QuantRecipe,
    RepairRecipe,
    ValidationRecipe,
    recipe_from_flags,
)
from .products import ConvertResult

__all__ = ["BayesRecipe", "ClusterRecipe", "ConvertRecipe", "ConvertResult", "InputRecipe", "QuantMode", "QuantRecipe",
           "RepairRecipe", "ValidationRecipe", "convert", "recipe_from_flags"]
