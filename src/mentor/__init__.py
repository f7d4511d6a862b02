"""mentor: teacher-student training in one loop.

The parts (see ``DESIGN.md``): :mod:`mentor.losses` (pure loss functions), :mod:`mentor.teachers` (where targets come
from), :mod:`mentor.targets` (target transforms), :mod:`mentor.schedules`, :mod:`mentor.method` (a method is data),
:mod:`mentor.recipes` (named methods), :mod:`mentor.train` (the loop), :mod:`mentor.eval`, :mod:`mentor.report`,
:mod:`mentor.data`, :mod:`mentor.models`, :mod:`mentor.config` and :mod:`mentor.cli`.
"""

from mentor import data, eval, losses, method, models, recipes, schedules, targets, teachers, train
from mentor.method import Method, Term
from mentor.train import FitResult, Optim, fit

__version__ = "0.1.0"

__all__ = ["FitResult", "Method", "Optim", "Term", "data", "eval", "fit", "losses", "method", "models", "recipes",
           "schedules", "targets", "teachers", "train"]
