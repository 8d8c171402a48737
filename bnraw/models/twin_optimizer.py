"""The raw twin of a user's Keras 3 optimizer (``bnraw.core.optim``), its slots in the Keras
optimizer's layout (keras_bridge.optimizer_slots), so that state is copied by position.

Supported: ``Adam`` (amsgrad too), ``AdamW``, ``SGD`` and ``RMSprop`` with a float learning
rate, optionally with ``weight_decay`` and one of ``clipnorm``, ``global_clipnorm`` or
``clipvalue``, and any of them inside a ``LossScaleOptimizer``. Anything else (another class, a
learning-rate schedule, ``use_ema``, gradient accumulation, a fixed ``loss_scale_factor``,
variables exempt from weight decay) is a :class:`UsageError`, since the twin could not follow
Keras bit for bit.
"""

from __future__ import annotations

from typing import Sequence

from bnraw.core import optim
from bnraw.errors import UsageError

SUPPORTED = "supported: Adam, AdamW, SGD, RMSprop"


def _refuse(keras_optimizer, setting: str) -> UsageError:
  return UsageError("keras_model", f"optimizer {type(keras_optimizer).__name__}: {setting} is "
                    f"not supported ({SUPPORTED}, with a float learning rate)")


def _number(keras_optimizer, name: str) -> float:
  value = getattr(keras_optimizer, name)
  try:
    return float(value)
  except (TypeError, ValueError):
    raise _refuse(keras_optimizer, f"{name}={value!r}") from None


def _optional_number(keras_optimizer, name: str):
  if getattr(keras_optimizer, name, None) is None:
    return None
  return _number(keras_optimizer, name)


def _common(keras_optimizer) -> dict:
  """The base optimizer's settings, checked: ``lr`` and the common keyword arguments."""
  import keras
  opt = keras_optimizer
  if not isinstance(opt._learning_rate, keras.Variable):
    raise _refuse(opt, f"a learning-rate schedule ({type(opt._learning_rate).__name__})")
  if opt.use_ema:
    raise _refuse(opt, "use_ema=True")
  if opt.gradient_accumulation_steps:
    raise _refuse(opt, f"gradient_accumulation_steps={opt.gradient_accumulation_steps}")
  if opt.loss_scale_factor is not None:
    raise _refuse(opt, f"loss_scale_factor={opt.loss_scale_factor}")
  if (getattr(opt, "_exclude_from_weight_decay", None)
      or getattr(opt, "_exclude_from_weight_decay_pattern", None) is not None):
    raise _refuse(opt, "exclude_from_weight_decay")
  return dict(lr=float(opt._learning_rate.numpy()),
              weight_decay=_optional_number(opt, "weight_decay"),
              clipnorm=_optional_number(opt, "clipnorm"),
              global_clipnorm=_optional_number(opt, "global_clipnorm"),
              clipvalue=_optional_number(opt, "clipvalue"))


def raw_optimizer(keras_optimizer, variables: Sequence):
  """The ``bnraw.core.optim`` twin of ``keras_optimizer`` over ``variables`` (the raw model's
  trainable variables, in the Keras optimizer's order), with fresh state: zero slots and
  ``iterations``; a ``LossScaleOptimizer`` becomes :class:`~bnraw.core.optim.LossScale` starting
  at the current dynamic scale (the initial one if not built yet)."""
  import keras
  opt = keras_optimizer
  if type(opt) is keras.optimizers.LossScaleOptimizer:
    inner = raw_optimizer(opt.inner_optimizer, variables)
    scale = float(opt.dynamic_scale.numpy()) if opt.built else float(opt.initial_scale)
    return optim.LossScale(inner, initial_scale=scale, growth_steps=int(opt.dynamic_growth_steps))
  kind = type(opt)
  if kind not in (keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.SGD,
                  keras.optimizers.RMSprop):
    raise UsageError("keras_model", f"optimizer {kind.__name__} is not supported ({SUPPORTED})")
  common = _common(opt)
  if kind in (keras.optimizers.Adam, keras.optimizers.AdamW):
    make = optim.AdamW if kind is keras.optimizers.AdamW else optim.Adam
    return make(variables, beta_1=_number(opt, "beta_1"), beta_2=_number(opt, "beta_2"),
                epsilon=_number(opt, "epsilon"), amsgrad=bool(opt.amsgrad), **common)
  if kind is keras.optimizers.SGD:
    return optim.SGD(variables, momentum=_number(opt, "momentum"), nesterov=bool(opt.nesterov),
                     **common)
  return optim.RMSprop(variables, rho=_number(opt, "rho"), momentum=_number(opt, "momentum"),
                       epsilon=_number(opt, "epsilon"), centered=bool(opt.centered), **common)
