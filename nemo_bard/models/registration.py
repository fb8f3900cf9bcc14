"""Register ``model_type: bard_vl`` with transformers' Auto classes, lazily.

Importing the bard_vl config or model class costs the Qwen3-VL configuration/modeling stack (seconds),
and transformers' Auto modules import each other (defining a Qwen3-VL config class reads the model
mapping), so nothing heavy may run while they load. Hence:

* :func:`register` (called by ``import nemo_bard``) registers :class:`LazyBardVLConfig` with
  ``AutoConfig`` as soon as transformers imports its config registry
  (``transformers.models.auto.configuration_auto``), or at once if it already has. That stand-in
  imports nothing; its first real use (``from_dict``, ``from_pretrained``, a call) loads
  :mod:`~nemo_bard.models.configuration_bard_vl`, which registers the real ``BardVLConfig`` in its place.
* The first bard_vl config that is created imports :mod:`~nemo_bard.models.modeling_bard_vl`, which
  registers the model with ``AutoModelForImageTextToText`` (and its text decoder with ``AutoModel``)
  and the processor with ``AutoProcessor``. ``from_pretrained`` creates the config before it looks up
  the model class, so ``AutoModelForImageTextToText.from_pretrained(bard_dir)`` works after a bare
  ``import nemo_bard``, which itself imports neither torch nor transformers.

NeMo AutoModel's model registry finds the training class through the ``nemo_automodel.architectures``
entry point (``setup.py``) and :mod:`nemo_bard.integrations.nemo`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any, Callable

MODEL_TYPE = "bard_vl"
DEFAULT_MASK_TOKEN_ID = 151671
# the mask token's text (Qwen3 tokenizers have no such token; convert adds it at DEFAULT_MASK_TOKEN_ID)
MASK_TOKEN = "<|mask|>"
DEFAULT_BLOCK_SIZE = 32
BARD_ARCHITECTURE = "BardVLForConditionalGeneration"
# Architecture names a bard_vl config.json may carry; all resolve to the same class.
ARCHITECTURE_ALIASES = (BARD_ARCHITECTURE, "BardQwen3VLForConditionalGeneration")

AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
CONFIG_MODULE = "nemo_bard.models.configuration_bard_vl"
MODELING_MODULE = "nemo_bard.models.modeling_bard_vl"
_lock = threading.Lock()
_registered = False


def _import_once(module_name: str) -> None:
    """Import ``module_name`` unless it is imported or being imported (it registers itself at its end)."""
    if module_name not in sys.modules:
        importlib.import_module(module_name)


def ensure_model_classes() -> None:
    """Import (and so register) the bard_vl model classes; called when the first bard_vl config is created."""
    _import_once(MODELING_MODULE)


class _RunAfterExec(importlib.abc.Loader):
    """Wraps a module's loader so that ``callback(module)`` runs right after the module has executed."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[ModuleType], None]) -> None:
        self.loader = loader
        self.callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.callback(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """One-shot meta-path finder: finds ``name`` with the other finders and wraps its loader."""

    def __init__(self, name: str, callback: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None):
        if fullname != self.name:
            return None
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RunAfterExec(spec.loader, self.callback)
                return spec
        return None


def when_imported(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Run ``callback(module)`` now if ``module_name`` is imported, else right after it is first imported."""
    module = sys.modules.get(module_name)
    if module is not None:
        callback(module)
        return
    with _lock:
        sys.meta_path.insert(0, _AfterImport(module_name, callback))


class _LoadOnUse(type):
    """Metaclass of :class:`LazyBardVLConfig`: everything but its name loads the real config class."""

    def __getattr__(cls, name: str) -> Any:
        return getattr(cls.load(), name)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.load()(*args, **kwargs)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls.load())


class LazyBardVLConfig(metaclass=_LoadOnUse):
    """Stand-in for ``BardVLConfig`` in ``AutoConfig``'s registry until the config module is imported."""

    model_type = MODEL_TYPE

    @staticmethod
    def load() -> type:
        """Import the real config class (its module replaces this stand-in in ``AutoConfig``)."""
        return importlib.import_module(CONFIG_MODULE).BardVLConfig


LazyBardVLConfig.__name__ = "BardVLConfig"  # transformers matches registered configs by class name


def _register_config(configuration_auto: ModuleType) -> None:
    if CONFIG_MODULE not in sys.modules:  # otherwise the config module registers the real class itself
        configuration_auto.AutoConfig.register(MODEL_TYPE, LazyBardVLConfig, exist_ok=True)


def register() -> None:
    """Make transformers' Auto classes know ``bard_vl`` as soon as transformers loads them (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    when_imported(AUTO_CONFIG_MODULE, _register_config)


__all__ = [
    "ARCHITECTURE_ALIASES",
    "BARD_ARCHITECTURE",
    "DEFAULT_MASK_TOKEN_ID",
    "MASK_TOKEN",
    "MODEL_TYPE",
    "LazyBardVLConfig",
    "ensure_model_classes",
    "register",
    "when_imported",
]
